/* New job: upload (with progress) and inspect a model, optionally a data set, preview the
   budget from the inspected totals, submit. Errors land next to the field the API names. */
"use strict";
(function () {
  var TT = window.TT;
  var state = { model: null, dataset: null, methodTouched: false };
  var $ = function (id) { return document.getElementById(id); };

  function progressUI(prefix) {
    var wrap = $(prefix + "-progress-wrap"), bar = $(prefix + "-progress"), text = $(prefix + "-progress-text");
    return function (fraction, sent) {
      wrap.hidden = false;
      bar.value = Math.round(fraction * 100);
      text.textContent = sent ? "Uploaded; checking the file…" : Math.round(fraction * 100) + " %";
    };
  }

  /* ---- model ---- */
  var MODEL_FIELDS = { file: "model-file-error", input_spec: "input-spec-error" };

  function renderModel(m) {
    var inv = m.inventory;
    $("model-name").textContent = m.name;
    $("model-macs").textContent = inv ? TT.human(inv.total_macs) : "—";
    $("model-params").textContent = inv ? TT.human(inv.total_params) : "—";
    $("model-layers").textContent = inv ? String(inv.layers.length) : "—";
    var tbody = $("layer-table").querySelector("tbody");
    tbody.textContent = "";
    (inv ? inv.layers : []).forEach(function (l) {
      var tr = document.createElement("tr");
      tr.appendChild(TT.el("td", l.name, "mono"));
      tr.appendChild(TT.el("td", l.kind));
      tr.appendChild(TT.el("td", (l.in_channels || "?") + " → " + (l.out_channels || "?")));
      tr.appendChild(TT.el("td", l.kernel ? l.kernel.join("×") : "—"));
      tr.appendChild(TT.el("td", TT.human(l.macs), "num"));
      tr.appendChild(TT.el("td", TT.human(l.params), "num"));
      tr.appendChild(TT.el("td", l.decomposable ? "yes" : "no" + (l.skip_reason ? ": " + l.skip_reason : "")));
      tbody.appendChild(tr);
    });
    $("model-summary").hidden = false;
    var start = {};  // the manual method's starting point: half ranks in every decomposable layer
    (inv ? inv.layers : []).forEach(function (l) { if (l.decomposable) start[l.name] = 0.5; });
    $("ranks").value = JSON.stringify(start, null, 1);
    updatePreview();
  }

  function showManual() {
    var manual = $("method-manual").checked;
    $("manual-field").hidden = !manual;
  }
  document.querySelectorAll('input[name="method"]').forEach(function (r) { r.addEventListener("change", showManual); });

  $("model-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var form = ev.target;
    TT.clearErrors(form);
    var file = $("model-file").files[0];
    var spec = $("input-spec").value.trim();
    var bad = false;
    if (!file) { TT.showError("model-file-error", "Choose the model file to upload."); bad = true; }
    if (!spec) { TT.showError("input-spec-error", "Give one sample's input shape, e.g. 3,224,224."); bad = true; }
    if (bad) { (file ? $("input-spec") : $("model-file")).focus(); return; }
    var fd = new FormData();
    fd.append("input_spec", spec);  // text fields first: the server reads them before the file
    fd.append("file", file, file.name);
    var button = $("model-upload");
    button.disabled = true;
    state.model = null;
    $("model-summary").hidden = true;
    TT.upload("/ui/api/models", fd, progressUI("model")).then(function (res) {
      button.disabled = false;
      $("model-progress-text").textContent = res.ok ? "Inspected." : "Failed.";
      if (res.ok) { state.model = res.body; renderModel(res.body); return; }
      var field = res.body && res.body.field;
      if (!TT.showError(MODEL_FIELDS[field] || "model-file-error", TT.problemText(res))) return;
      $(field === "input_spec" ? "input-spec" : "model-file").focus();
    });
  });

  /* ---- data set ---- */
  $("dataset-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    TT.clearErrors(ev.target);
    var file = $("dataset-file").files[0];
    if (!file) { TT.showError("dataset-file-error", "Choose a data file to upload."); $("dataset-file").focus(); return; }
    var fd = new FormData();
    if ($("dataset-format").value) fd.append("format", $("dataset-format").value);
    fd.append("file", file, file.name);
    $("dataset-upload").disabled = true;
    TT.upload("/ui/api/datasets", fd, progressUI("dataset")).then(function (res) {
      $("dataset-upload").disabled = false;
      $("dataset-progress-text").textContent = res.ok ? "Checked." : "Failed.";
      if (!res.ok) { TT.showError("dataset-file-error", TT.problemText(res)); $("dataset-file").focus(); return; }
      state.dataset = res.body;
      var s = $("dataset-summary");
      s.textContent = res.body.name + ": " + (res.body.num_samples != null ? res.body.num_samples + " samples, " : "") +
        res.body.format + ". Used for data-aware methods and fine-tuning.";
      s.hidden = false;
      $("finetune-hint").textContent = "Uses " + res.body.name + ".";
      if (!state.methodTouched) $("method-batude").checked = true;
    });
  });

  /* ---- budget ---- */
  var NAMES = { flops: "MACs", params: "parameters" };

  function budgetText() {
    var metric = $("budget-metric").value, unit = $("budget-unit").value, t = $("budget-target").value.trim();
    if (metric === "latency") return "latency:" + t + "ms@1";
    return metric + ":" + t + (unit === "%" ? "%" : "x");
  }

  function syncUnits() {
    var latency = $("budget-metric").value === "latency";
    var unit = $("budget-unit");
    unit.querySelector('option[value="ms"]').disabled = !latency;
    unit.querySelector('option[value="x"]').disabled = latency;
    unit.querySelector('option[value="%"]').disabled = latency;
    if (latency) unit.value = "ms";
    else if (unit.value === "ms") unit.value = "x";
  }

  function updatePreview() {
    syncUnits();
    var out = $("budget-preview");
    var metric = $("budget-metric").value, unit = $("budget-unit").value;
    var t = parseFloat($("budget-target").value);
    if (metric === "latency") {
      out.textContent = isFinite(t) && t > 0 ? "At most " + t + " ms per sample at batch 1, measured on the worker's device."
        : "Enter a time in milliseconds.";
      return;
    }
    if (!isFinite(t) || t <= 0) { out.textContent = "Enter a target."; return; }
    var keep = unit === "%" ? t / 100 : 1 / t;
    if (unit === "x" && t <= 1) { out.textContent = "A reduction factor must be greater than 1."; return; }
    if (unit === "%" && t >= 100) { out.textContent = "Keep less than 100 %."; return; }
    var inv = state.model && state.model.inventory;
    if (!inv) { out.textContent = "Keeps " + (keep * 100).toFixed(1) + " % of the " + NAMES[metric] + " (" + (1 / keep).toFixed(1) + "x fewer)."; return; }
    var total = metric === "flops" ? inv.total_macs : inv.total_params;
    out.textContent = "≈ " + TT.human(total * keep) + " " + NAMES[metric] + " of " + TT.human(total) + ", " +
      (1 / keep).toFixed(1) + "x fewer.";
  }

  ["budget-metric", "budget-unit", "budget-target"].forEach(function (id) {
    $(id).addEventListener("input", updatePreview);
    $(id).addEventListener("change", updatePreview);
  });
  document.querySelectorAll('input[name="method"]').forEach(function (r) {
    r.addEventListener("change", function () { state.methodTouched = true; });
  });
  updatePreview();

  /* ---- submit ---- */
  var JOB_FIELDS = {
    budget: "budget-error", method: "method-error", model_id: "model-file-error", input_spec: "input-spec-error",
    dataset_id: "dataset-file-error", form: "job-error", sweep: "sweep-error", ranks: "ranks-error",
  };

  $("job-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    TT.clearErrors(ev.target);
    if (!state.model) {
      TT.clearErrors($("model-form"));
      TT.showError("model-file-error", "Upload a model first.");
      $("model-file").focus();
      return;
    }
    var t = parseFloat($("budget-target").value);
    if (!isFinite(t) || t <= 0) { TT.showError("budget-error", "Enter a positive target."); $("budget-target").focus(); return; }
    var method = document.querySelector('input[name="method"]:checked');
    var body = {
      model_id: state.model.id,
      budget: budgetText(),
      method: method ? method.value : null,
      form: $("form-select").value,
    };
    if (state.model.input_spec) body.input_spec = state.model.input_spec;
    if (body.method === "manual") {
      try { body.ranks = JSON.parse($("ranks").value); } catch (e) { body.ranks = null; }
      if (!body.ranks || typeof body.ranks !== "object" || Array.isArray(body.ranks)) {
        TT.showError("ranks-error", "Write the ranks as a JSON object, e.g. {\"conv1\": [8, 16], \"fc\": 0.5}.");
        $("ranks").focus();
        return;
      }
    }
    if (state.dataset) body.dataset_id = state.dataset.id;
    if ($("finetune").checked) {
      // An empty field leaves the epochs to the engine's default.
      var epochs = parseInt($("finetune-epochs").value, 10);
      body.finetune = epochs ? { epochs: epochs } : {};
    }
    var sweep = $("sweep").value.split(",").map(function (b) { return b.trim(); }).filter(Boolean);
    if (sweep.length) body.sweep = sweep;
    var button = $("submit-job");
    button.disabled = true;
    TT.fetchJSON("/ui/api/jobs", { method: "POST", json: body }).then(function (res) {
      if (res.ok) { window.location.assign("/ui/jobs/" + res.body.id); return; }
      button.disabled = false;
      var field = res.body && res.body.field ? String(res.body.field).split(".")[0] : null;
      var target = JOB_FIELDS[field] || "job-error";
      TT.showError(target, TT.problemText(res));
      var input = $(target.replace(/-error$/, ""));
      if (target === "budget-error") $("budget-target").focus();
      else if (input && input.focus) input.focus();
    });
  });
})();
