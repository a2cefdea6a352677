/* Shared helpers for the TensorTrim pages: CSRF header, problem details, field errors. */
"use strict";
(function () {
  var meta = document.querySelector('meta[name="csrf-token"]');
  var TT = (window.TT = {});
  TT.csrf = meta ? meta.getAttribute("content") : "";

  TT.fetchJSON = function (url, options) {
    options = options || {};
    var headers = Object.assign({ "X-CSRF-Token": TT.csrf, Accept: "application/json" }, options.headers || {});
    if (options.json !== undefined) {
      headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(options.json);
    }
    return fetch(url, {
      method: options.method || "GET", headers: headers, body: options.body, credentials: "same-origin",
    }).then(function (r) {
      return r.text().then(function (t) {
        var body = null;
        try { body = t ? JSON.parse(t) : null; } catch (e) { body = { detail: t }; }
        return { status: r.status, ok: r.ok, body: body };
      });
    });
  };

  /* Upload FormData with XMLHttpRequest so the upload's progress can be shown. */
  TT.upload = function (url, formData, onProgress) {
    return new Promise(function (resolve) {
      var xhr = new XMLHttpRequest();
      xhr.open("POST", url);
      xhr.setRequestHeader("X-CSRF-Token", TT.csrf);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.onprogress = function (e) { if (e.lengthComputable) onProgress(e.loaded / e.total); };
      xhr.upload.onload = function () { onProgress(1, true); };
      xhr.onload = function () {
        var body = null;
        try { body = JSON.parse(xhr.responseText); } catch (e) { body = { detail: xhr.responseText }; }
        resolve({ status: xhr.status, ok: xhr.status >= 200 && xhr.status < 300, body: body });
      };
      xhr.onerror = function () { resolve({ status: 0, ok: false, body: { detail: "network error: is the server up?" } }); };
      xhr.send(formData);
    });
  };

  TT.problemText = function (res) {
    if (res.status === 401) return "Your session has ended: sign in again (reload the page).";
    var b = res.body || {};
    return b.detail || b.title || "request failed (HTTP " + res.status + ")";
  };

  TT.showError = function (id, message) {
    var el = document.getElementById(id);
    if (!el) return false;
    el.textContent = message;
    el.hidden = false;
    var input = document.querySelector('[aria-describedby~="' + id + '"]') || document.getElementById(id.replace(/-error$/, ""));
    if (input && input.tagName !== "FIELDSET") input.setAttribute("aria-invalid", "true");
    var field = el.closest(".field");
    if (field) field.classList.add("has-error");
    return true;
  };

  TT.clearErrors = function (root) {
    root.querySelectorAll(".error").forEach(function (el) {
      el.hidden = true; el.textContent = "";
      var field = el.closest(".field");
      if (field) field.classList.remove("has-error");
    });
    root.querySelectorAll('[aria-invalid="true"]').forEach(function (el) { el.removeAttribute("aria-invalid"); });
  };

  TT.human = function (v) {
    if (v === null || v === undefined || !isFinite(v)) return "—";
    var units = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
    for (var i = 0; i < units.length; i++) {
      if (Math.abs(v) >= units[i][0]) return Number((v / units[i][0]).toPrecision(3)) + " " + units[i][1];
    }
    return String(Number(v.toPrecision(3)));
  };

  TT.el = function (tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  };
})();
