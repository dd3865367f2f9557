/* The server's /ui page: a prompt form that calls /v1/generate with analysis and draws the result with
   FaithlensAudit (audit.js, the same renderer AuditReport.to_html inlines). */
(function () {
  "use strict";
  var form = document.getElementById("fl-form");
  var status = document.getElementById("fl-status");
  var out = document.getElementById("fl-audit");
  var adapterSelect = document.getElementById("fl-adapter");
  var keyInput = document.getElementById("fl-key");

  function headers() {
    var h = { "Content-Type": "application/json" };
    if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
    return h;
  }

  function loadModels() {
    fetch("/v1/models", { headers: headers() }).then(function (r) { return r.ok ? r.json() : null; }).then(function (body) {
      if (!body) return;
      adapterSelect.innerHTML = "";
      body.data.forEach(function (m) {
        var opt = document.createElement("option");
        opt.value = m.parent ? m.id : "";
        opt.textContent = m.parent ? m.id + " (adapter)" : m.id + " (base)";
        adapterSelect.appendChild(opt);
      });
    });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var data = new FormData(form);
    var analysis = { metrics: ["fai", "waad", "flags"] };
    if (data.get("saliency")) analysis.saliency = { method: data.get("saliency") };
    var body = { prompt: data.get("prompt"), chat: true, max_new_tokens: Number(data.get("max_new_tokens")),
                 temperature: 0, analysis: analysis };
    if (data.get("adapter")) body.adapter = data.get("adapter");
    status.textContent = "generating…";
    status.className = "fl-status";
    fetch("/v1/generate", { method: "POST", headers: headers(), body: JSON.stringify(body) })
      .then(function (r) { return r.json().then(function (j) { return { ok: r.ok, body: j }; }); })
      .then(function (res) {
        if (!res.ok) throw new Error(res.body.error ? res.body.error.code + ": " + res.body.error.message : "request failed");
        status.textContent = res.body.usage.completion_tokens + " tokens in " + res.body.timings.total_s.toFixed(2) + " s";
        FaithlensAudit.render(out, res.body.annotations);
      })
      .catch(function (err) { status.textContent = String(err.message || err); status.className = "fl-status fl-error"; });
  });
  keyInput.addEventListener("change", loadModels);
  loadModels();
})();
