// The share link page (/s/#<token>): the token is in the fragment, which the browser never
// sends to a server. Take it out of the address bar (and so out of the history), then post it
// with the page's CSRF token; the server swaps it for a session and redirects.
(function () {
  "use strict";
  var token = window.location.hash.slice(1);
  if (!token) {
    return; // no token: the page offers the access code form
  }
  window.history.replaceState(null, "", window.location.pathname + window.location.search);
  var form = document.getElementById("link-form");
  document.getElementById("link-token").value = token;
  document.getElementById("link-opening").hidden = false;
  document.getElementById("link-code").hidden = true;
  form.submit();
})();
