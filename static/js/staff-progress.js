// The share page: follows the retrieval of each study by polling the page's progress
// endpoint (data-url) and updates the bars in place. A failure, which brings a retry button,
// reloads the page once to show it; the share's status line follows too.
(function () {
  "use strict";
  var list = document.getElementById("progress");
  if (!list || !list.dataset.url) { return; }
  var status = document.getElementById("progress-status");
  var delay = 1500;

  function update(row) {
    var item = list.querySelector('li[data-uid="' + row.uid + '"]');
    if (!item) { return false; }
    var bar = item.querySelector("progress");
    if (bar) { bar.value = row.percent; bar.textContent = row.percent + " %"; }
    var state = item.querySelector(".state");
    if (state) { state.textContent = row.label; }
    var counts = item.querySelector(".counts");
    if (counts) {
      counts.textContent = row.received + " / " + (row.expected === null ? "?" : row.expected);
    }
    // A new failure: its explanation and retry button come with the page.
    return row.state === "failed" && !item.querySelector(".alert");
  }

  function poll() {
    fetch(list.dataset.url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) {
        if (!response.ok) { throw new Error(String(response.status)); }
        return response.json();
      })
      .then(function (data) {
        var reload = false;
        data.studies.forEach(function (row) { reload = update(row) || reload; });
        // The share's own status (pending, then active once every study is in).
        var shown = document.getElementById("share-status");
        if (shown && shown.dataset.status !== data.status) {
          shown.dataset.status = data.status;
          shown.textContent = data.status_label;
        }
        if (reload) { window.location.reload(); return; }
        if (!data.done) { window.setTimeout(poll, delay); }
      })
      .catch(function () {
        if (status) { status.textContent = status.dataset.offline || ""; }
        window.setTimeout(poll, delay * 4);
      });
  }
  window.setTimeout(poll, delay);
}());
