// swinssl report: records the page's errors where a reader (and swinssl's browser tests) can see
// them, in the element with id page-errors. Runs before anything else on the page.
"use strict";
(function () {
  const errors = [];
  function show() {
    const box = document.getElementById("page-errors");
    if (!box) return;
    box.textContent = errors.length ? "Errors on this page:\n" + errors.join("\n") : "";
    box.hidden = errors.length === 0;
  }
  window.recordReportError = function (text) {
    errors.push(String(text));
    show();
  };
  // Capturing: also sees an element's failed load (an image or script the page would fetch).
  window.addEventListener("error", function (event) {
    const target = event.target;
    if (target && target !== window && (target.src || target.href)) {
      window.recordReportError("could not load " + (target.src || target.href));
    } else {
      window.recordReportError("error: " + (event.message || event.type));
    }
  }, true);
  window.addEventListener("unhandledrejection", function (event) {
    const reason = event.reason;
    window.recordReportError("unhandled rejection: " + ((reason && reason.message) || reason));
  });
  const consoleError = console.error.bind(console);
  console.error = function (...args) {
    window.recordReportError("console.error: " + args.map(String).join(" "));
    consoleError(...args);
  };
  document.addEventListener("DOMContentLoaded", show);
})();
