// The image viewer (dicomweb/templates/dicomweb/viewer.html). No inline script and no
// framework: the page carries the slices of every series as JSON (#viewer-data) and the first
// image as a plain <img>, which the browser fetches while it parses; this script then
// prefetches the neighbouring slices and wires scrolling, contrast, zoom and saving.
//
// Frames are rendered by the server (DICOMweb "rendered" resources, PS3.18 §10.4.1.1.4) at a
// size that fits the screen, with the window asked for. Answers are marked no-store, so the
// prefetched <img> elements themselves are what we keep: showing a slice moves its element
// into the pane once it has decoded, and the previous one stays on screen until then (no blank
// frame, however fast the scrolling).
(function () {
  "use strict";

  var root = document.getElementById("viewer");
  var dataElement = document.getElementById("viewer-data");
  var stage = document.getElementById("viewer-stage");
  if (!root || !dataElement || !stage) { return; }

  var data = JSON.parse(dataElement.textContent);
  var pane = document.getElementById("viewer-pane");
  var counter = document.getElementById("viewer-counter");
  var windowOutput = document.getElementById("viewer-window");
  var status = document.getElementById("viewer-status");
  var slider = document.getElementById("viewer-slider");
  var presets = document.getElementById("viewer-presets");
  var first = document.getElementById("viewer-first");

  // How many slices load at once (a browser opens six connections to a host over HTTP/1.1).
  var MAX_LOADING = 6;
  var MIN_ZOOM = 1;
  var MAX_ZOOM = 8;

  var state = {
    series: data.series[0],
    index: 0,
    direction: 1, // the way the last move went: the prefetch looks further that way
    window: "", // "" is the file's own window; else "center,width"
    viewport: data.viewport,
    zoom: 1,
    x: 0,
    y: 0,
    mode: "browse",
    adjusting: false
  };
  // URL → {img, index, series, status: "loading" | "ready" | "failed"}
  var frames = new Map();
  var loading = 0;
  var shown = { img: first, index: 0, series: state.series };
  // The window each series starts from when dragged: its first image's own (fetched once).
  var ownWindows = new Map();

  // --- URLs and loading ----------------------------------------------------------------------

  function frameUrl(series, index) {
    var slice = series.slices[index];
    var url = series.base + slice[0] + "/frames/" + slice[1] + "/rendered?viewport=" +
      state.viewport + "," + state.viewport;
    return state.window ? url + "&window=" + state.window : url;
  }

  function viewportFor(width, height) {
    // One of three sizes, so that URLs (and the server's cache) stay the same from one
    // screen to the next; the server never enlarges a frame beyond its own size.
    var needed = Math.max(width, height) * (window.devicePixelRatio || 1);
    if (needed <= 640) { return 512; }
    if (needed <= 1280) { return 1024; }
    return 2048;
  }

  function load(series, index) {
    var url = frameUrl(series, index);
    var frame = frames.get(url);
    if (frame && frame.status !== "failed") { return frame; }
    var img = new Image();
    img.decoding = "async";
    img.className = "viewer-frame";
    img.alt = "";
    frame = { img: img, index: index, series: series, status: "loading" };
    frames.set(url, frame);
    loading += 1;
    img.src = url;
    img.decode().then(function () {
      frame.status = "ready";
    }, function () {
      frame.status = "failed";
    }).then(function () {
      loading -= 1;
      if (frames.get(url) === frame) { arrived(url, frame); }
      pump();
    });
    return frame;
  }

  function arrived(url, frame) {
    if (url !== frameUrl(state.series, state.index)) { return; }
    if (frame.status === "ready") {
      display(frame);
    } else {
      status.textContent = root.dataset.error;
    }
  }

  // Prefetch: the nearest slices first, twice as far ahead (in the direction of the last move)
  // as behind, then the rest of the series, MAX_LOADING at a time. Not while the contrast is
  // being dragged: each move asks for a new window, and only the slice on screen matters until
  // the drag ends.
  function pump() {
    if (state.adjusting) { return; }
    var series = state.series;
    var count = series.slices.length;
    var ahead = state.direction;
    for (var distance = 0; distance < 2 * count && loading < MAX_LOADING; distance++) {
      var candidates = [state.index + ahead * distance, state.index - ahead * Math.ceil(distance / 2)];
      for (var k = 0; k < candidates.length && loading < MAX_LOADING; k++) {
        var index = candidates[k];
        if (index < 0 || index >= count) { continue; }
        if (!frames.has(frameUrl(series, index))) { load(series, index); }
      }
    }
  }

  // --- Showing a slice -----------------------------------------------------------------------

  function label(template, values) {
    return template.replace(/%\((\w+)\)s/g, function (_match, name) { return values[name]; });
  }

  function display(frame) {
    if (shown.img !== frame.img) {
      frame.img.alt = label(root.dataset.alt, { n: frame.index + 1, total: frame.series.slices.length });
      pane.replaceChildren(frame.img);
    }
    shown = frame;
    status.textContent = "";
    counter.textContent = (frame.index + 1) + " / " + frame.series.slices.length;
  }

  function show(index) {
    var count = state.series.slices.length;
    index = Math.max(0, Math.min(count - 1, index));
    if (index !== state.index) { state.direction = index > state.index ? 1 : -1; }
    state.index = index;
    slider.value = String(state.index + 1);
    slider.setAttribute("aria-valuetext", (state.index + 1) + " / " + count);
    var frame = load(state.series, state.index);
    if (frame.status === "ready") { display(frame); }
    pump();
  }

  function step(delta) { show(state.index + delta); }

  function selectSeries(uid) {
    var series = data.series.find(function (s) { return s.uid === uid; });
    if (!series || series === state.series) { return; }
    state.series = series;
    var ct = series.modality === "CT";
    presets.hidden = !ct;
    if (!ct && state.window) { setWindow("", false); }
    slider.max = String(series.slices.length);
    document.querySelectorAll(".series-pick").forEach(function (button) {
      button.setAttribute("aria-pressed", button.dataset.series === uid ? "true" : "false");
    });
    resetView();
    state.index = 0;
    state.direction = 1;
    show(0);
    var box = stage.getBoundingClientRect();
    if (box.top < 0 || box.bottom > window.innerHeight) {
      stage.scrollIntoView({ block: "start" });
    }
  }

  // --- Window (contrast) ---------------------------------------------------------------------

  function setWindow(value, fromPreset) {
    state.window = value;
    // Frames of another window are of no further use; the one on screen stays until the new
    // one has decoded.
    frames.clear();
    var parts = value ? value.split(",") : null;
    windowOutput.textContent = parts ? label(root.dataset.windowLabel, { center: parts[0], width: parts[1] }) : "";
    presets.querySelectorAll("[data-window]").forEach(function (button) {
      button.setAttribute("aria-pressed", fromPreset && button.dataset.window === value ? "true" : "false");
    });
    show(state.index);
  }

  function metadataWindow(series) {
    // The window the first image of the series carries (PS3.3 C.11.2.1.2: Window Center
    // (0028,1050) and Window Width (0028,1051)), from its DICOM JSON metadata.
    if (ownWindows.has(series.uid)) { return; }
    ownWindows.set(series.uid, null);
    fetch(series.base + series.slices[0][0] + "/metadata", {
      credentials: "same-origin",
      headers: { Accept: "application/dicom+json" }
    }).then(function (response) {
      return response.ok ? response.json() : [];
    }).then(function (documents) {
      var dataset = documents[0] || {};
      var center = dataset["00281050"] && dataset["00281050"].Value;
      var width = dataset["00281051"] && dataset["00281051"].Value;
      if (center && width) { ownWindows.set(series.uid, [Number(center[0]), Number(width[0])]); }
    }).catch(function () { /* the drag starts from a default window */ });
  }

  function currentWindow() {
    if (state.window) { return state.window.split(",").map(Number); }
    var own = ownWindows.get(state.series.uid);
    if (own) { return own; }
    return state.series.modality === "CT" ? [40, 400] : [500, 1000];
  }

  var windowTimer = null;
  function dragWindow(start, dx, dy) {
    // Right widens the window (less contrast), down raises its centre (darker): the common
    // convention of viewing stations.
    var width = Math.max(1, Math.round(start[1] * Math.exp(dx / 200)));
    var center = Math.round(start[0] + dy * start[1] / 300);
    var value = center + "," + width;
    if (value === state.window || windowTimer) {
      state.pendingWindow = value;
      return;
    }
    setWindow(value, false);
    // At most one new window every 60 ms while dragging; the last one always goes out.
    windowTimer = setTimeout(function () {
      windowTimer = null;
      if (state.pendingWindow && state.pendingWindow !== state.window) { setWindow(state.pendingWindow, false); }
      state.pendingWindow = null;
    }, 60);
  }

  // --- Zoom and pan --------------------------------------------------------------------------

  function applyTransform() {
    pane.style.transform = "translate(" + state.x + "px, " + state.y + "px) scale(" + state.zoom + ")";
  }

  function zoomAt(factor, cx, cy) {
    // (cx, cy): the point that stays put, from the stage's centre.
    var zoom = Math.max(MIN_ZOOM, Math.min(MAX_ZOOM, state.zoom * factor));
    var ratio = zoom / state.zoom;
    state.x = cx - (cx - state.x) * ratio;
    state.y = cy - (cy - state.y) * ratio;
    state.zoom = zoom;
    if (zoom === 1) { state.x = 0; state.y = 0; }
    applyTransform();
  }

  function resetView() {
    state.zoom = 1;
    state.x = 0;
    state.y = 0;
    applyTransform();
  }

  function fromCentre(clientX, clientY) {
    var box = stage.getBoundingClientRect();
    return [clientX - box.left - box.width / 2, clientY - box.top - box.height / 2];
  }

  // --- Pointers: one finger or the mouse by mode, two fingers pinch --------------------------

  var pointers = new Map();
  var gesture = null;

  function startGesture() {
    var points = Array.from(pointers.values());
    if (points.length >= 2) {
      var a = points[0];
      var b = points[1];
      gesture = {
        kind: "pinch",
        distance: Math.hypot(b.x - a.x, b.y - a.y) || 1,
        mid: [(a.x + b.x) / 2, (a.y + b.y) / 2],
        zoom: state.zoom,
        x: state.x,
        y: state.y
      };
    } else if (points.length === 1) {
      gesture = {
        kind: state.mode,
        start: [points[0].x, points[0].y],
        index: state.index,
        window: currentWindow(),
        x: state.x,
        y: state.y
      };
      if (state.mode === "contrast") { state.adjusting = true; }
    } else {
      gesture = null;
    }
  }

  function endGesture() {
    if (state.adjusting) {
      state.adjusting = false;
      pump();
    }
    startGesture();
  }

  stage.addEventListener("pointerdown", function (event) {
    if (event.pointerType === "mouse" && event.button !== 0) { return; }
    stage.setPointerCapture(event.pointerId);
    pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
    startGesture();
  });

  stage.addEventListener("pointermove", function (event) {
    var point = pointers.get(event.pointerId);
    if (!point || !gesture) { return; }
    point.x = event.clientX;
    point.y = event.clientY;
    if (gesture.kind === "pinch") {
      var points = Array.from(pointers.values());
      var a = points[0];
      var b = points[1];
      var zoom = Math.max(MIN_ZOOM, Math.min(MAX_ZOOM, gesture.zoom * Math.hypot(b.x - a.x, b.y - a.y) / gesture.distance));
      var mid = [(a.x + b.x) / 2, (a.y + b.y) / 2];
      var centre = fromCentre(gesture.mid[0], gesture.mid[1]);
      var ratio = zoom / gesture.zoom;
      state.zoom = zoom;
      state.x = centre[0] - (centre[0] - gesture.x) * ratio + (mid[0] - gesture.mid[0]);
      state.y = centre[1] - (centre[1] - gesture.y) * ratio + (mid[1] - gesture.mid[1]);
      applyTransform();
      return;
    }
    var dx = point.x - gesture.start[0];
    var dy = point.y - gesture.start[1];
    if (gesture.kind === "browse") {
      // A swipe over the whole image pages through up to the whole series, never slower than
      // one slice for 20 px nor faster than one for 3 px. Up goes forward, like a page.
      var perSlice = Math.max(3, Math.min(20, stage.clientHeight / state.series.slices.length));
      var target = gesture.index + Math.round(-dy / perSlice);
      if (target !== state.index) { show(target); }
    } else if (gesture.kind === "contrast") {
      dragWindow(gesture.window, dx, dy);
    } else {
      state.x = gesture.x + dx;
      state.y = gesture.y + dy;
      applyTransform();
    }
  });

  function pointerEnd(event) {
    if (!pointers.delete(event.pointerId)) { return; }
    endGesture();
  }
  stage.addEventListener("pointerup", pointerEnd);
  stage.addEventListener("pointercancel", pointerEnd);

  // The wheel pages through slices (one per notch of a mouse wheel, a trackpad's smooth
  // scrolling in steps of 25 px); with Ctrl (and a trackpad's pinch, which browsers report
  // so) it zooms about the pointer.
  var wheelRest = 0;
  stage.addEventListener("wheel", function (event) {
    event.preventDefault();
    var delta = event.deltaMode === 1 ? event.deltaY * 40 : event.deltaY;
    if (event.ctrlKey) {
      var at = fromCentre(event.clientX, event.clientY);
      zoomAt(Math.exp(-delta / 300), at[0], at[1]);
      return;
    }
    if (Math.abs(delta) >= 50) {
      wheelRest = 0;
      step(delta > 0 ? 1 : -1);
      return;
    }
    wheelRest += delta;
    var steps = Math.trunc(wheelRest / 25);
    if (steps) {
      wheelRest -= steps * 25;
      step(steps);
    }
  }, { passive: false });

  // --- Keyboard ------------------------------------------------------------------------------

  var KEYS = {
    ArrowDown: 1, ArrowRight: 1, PageDown: 10,
    ArrowUp: -1, ArrowLeft: -1, PageUp: -10
  };
  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey) { return; }
    var target = event.target;
    if (target.closest && target.closest("input, select, textarea, a, form")) { return; }
    var handled = true;
    if (event.key in KEYS) {
      step(KEYS[event.key]);
    } else if (event.key === "Home") {
      show(0);
    } else if (event.key === "End") {
      show(state.series.slices.length - 1);
    } else if (event.key === "+" || event.key === "=") {
      zoomAt(1.25, 0, 0);
    } else if (event.key === "-") {
      zoomAt(0.8, 0, 0);
    } else if (event.key === "0") {
      resetView();
    } else {
      handled = false;
    }
    if (handled) { event.preventDefault(); }
  });

  // --- Controls ------------------------------------------------------------------------------

  slider.addEventListener("input", function () { show(Number(slider.value) - 1); });
  document.getElementById("viewer-prev").addEventListener("click", function () { step(-1); });
  document.getElementById("viewer-next").addEventListener("click", function () { step(1); });

  document.querySelectorAll("[data-mode]").forEach(function (button) {
    button.addEventListener("click", function () {
      state.mode = button.dataset.mode;
      stage.dataset.mode = state.mode;
      document.querySelectorAll("[data-mode]").forEach(function (other) {
        other.setAttribute("aria-pressed", other === button ? "true" : "false");
      });
      if (state.mode === "contrast") { metadataWindow(state.series); }
    });
  });

  document.querySelectorAll("[data-zoom]").forEach(function (button) {
    button.addEventListener("click", function () {
      var how = button.dataset.zoom;
      if (how === "in") { zoomAt(1.25, 0, 0); } else if (how === "out") { zoomAt(0.8, 0, 0); } else { resetView(); }
    });
  });

  presets.querySelectorAll("[data-window]").forEach(function (button) {
    button.addEventListener("click", function () { setWindow(button.dataset.window, true); });
  });

  document.querySelectorAll(".series-pick").forEach(function (button) {
    button.addEventListener("click", function () { selectSeries(button.dataset.series); });
  });

  // Save the image on screen as a JPEG with "not for diagnostic use" burned in: drawn on a
  // canvas (the frames come from this origin, so it can be exported) and handed to the
  // browser as a download.
  document.getElementById("viewer-save").addEventListener("click", function () {
    var img = shown.img;
    if (!img.naturalWidth) { return; }
    var scale = Math.max(1, 512 / img.naturalWidth);
    var width = Math.round(img.naturalWidth * scale);
    var height = Math.round(img.naturalHeight * scale);
    var band = Math.max(24, Math.round(height / 14));
    var canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height + band;
    var context = canvas.getContext("2d");
    context.fillStyle = "#000";
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.drawImage(img, 0, 0, width, height);
    var text = root.dataset.burn + " · " + (shown.index + 1) + "/" + shown.series.slices.length;
    var size = Math.round(band * 0.55);
    context.font = "bold " + size + "px sans-serif";
    while (size > 8 && context.measureText(text).width > width - 16) {
      size -= 1;
      context.font = "bold " + size + "px sans-serif";
    }
    context.fillStyle = "#fff";
    context.textBaseline = "middle";
    context.fillText(text, 8, height + band / 2);
    canvas.toBlob(function (blob) {
      if (!blob) { return; }
      var link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = root.dataset.filename + "-" + (shown.index + 1) + ".jpg";
      document.body.appendChild(link);
      link.click();
      link.remove();
      setTimeout(function () { URL.revokeObjectURL(link.href); }, 10000);
    }, "image/jpeg", 0.92);
  });

  // --- Start ---------------------------------------------------------------------------------

  stage.dataset.mode = state.mode;
  var box = stage.getBoundingClientRect();
  var firstUrl = frameUrl(state.series, 0);
  state.viewport = viewportFor(box.width, box.height);
  var firstFrame = { img: first, index: 0, series: state.series, status: "loading" };
  if (frameUrl(state.series, 0) === firstUrl) { frames.set(firstUrl, firstFrame); }
  shown = firstFrame;
  first.alt = label(root.dataset.alt, { n: 1, total: state.series.slices.length });

  function started() {
    firstFrame.status = first.naturalWidth ? "ready" : "failed";
    if (firstFrame.status === "failed") { status.textContent = root.dataset.error; }
    pump();
  }
  if (first.complete) {
    started();
  } else {
    first.addEventListener("load", started, { once: true });
    first.addEventListener("error", started, { once: true });
  }
})();
