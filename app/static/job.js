/* Job detail: live progress over Server-Sent Events, cancel. The page reloads once the job
   ends, so the results (tables, charts, downloads) are rendered by the server. */
"use strict";
(function () {
  var TT = window.TT;
  var live = document.getElementById("live");
  if (!live) return;
  var jobId = live.getAttribute("data-job-id");
  var $ = function (id) { return document.getElementById(id); };
  var LABELS = { queued: "Queued", running: "Running", cancelling: "Cancelling", succeeded: "Done",
                 failed: "Failed", cancelled: "Cancelled" };

  function setStatus(status) {
    if (!status) return;
    var badge = $("job-status");
    badge.textContent = LABELS[status] || status;
    badge.className = "badge st-" + status;
    live.setAttribute("data-status", status);
    if (status === "cancelling" && $("cancel-job")) $("cancel-job").disabled = true;
  }

  function setProgress(d) {
    if (typeof d.progress === "number") {
      var pct = Math.max(0, Math.min(100, d.progress * 100));
      $("job-progress").value = pct;
      $("job-percent").textContent = Math.round(pct) + " %";
    }
    if (d.phase) $("job-phase").textContent = d.phase;
    if ("eta_seconds" in d) $("job-eta").textContent = d.eta_seconds == null ? "—" : Math.round(d.eta_seconds) + " s";
    if (d.message) $("job-message").textContent = d.message;
    if (d.status) setStatus(d.status);
  }

  if (live.getAttribute("data-active") === "true" && window.EventSource) {
    var es = new EventSource("/ui/api/jobs/" + encodeURIComponent(jobId) + "/events");
    var parse = function (e) { try { return JSON.parse(e.data); } catch (x) { return {}; } };
    es.addEventListener("progress", function (e) { setProgress(parse(e)); });
    es.addEventListener("status", function (e) {
      var d = parse(e);
      setStatus(d.status);
      if (d.message) $("job-message").textContent = d.message;
    });
    es.addEventListener("end", function (e) {
      es.close();
      var d = parse(e);
      setStatus(d.status);
      if (d.status === "succeeded") { $("job-progress").value = 100; $("job-percent").textContent = "100 %"; }
      $("job-message").textContent = "Finished: loading the results…";
      window.setTimeout(function () { window.location.reload(); }, 300);
    });
    es.onerror = function () {
      if (es.readyState === EventSource.CLOSED) $("job-message").textContent = "Live updates stopped: reload the page.";
    };
  }

  var cancel = $("cancel-job");
  if (cancel) {
    cancel.addEventListener("click", function () {
      cancel.disabled = true;
      $("cancel-error").hidden = true;
      TT.fetchJSON("/ui/api/jobs/" + encodeURIComponent(jobId) + "/cancel", { method: "POST" }).then(function (res) {
        if (res.ok) { setStatus(res.body.status); if (res.body.status === "cancelled") window.location.reload(); return; }
        cancel.disabled = false;
        TT.showError("cancel-error", TT.problemText(res));
      });
    });
  }
})();
