// The API keys page: create and revoke through /api/keys (the session, with the CSRF token).
(function () {
  "use strict";
  var page = document.getElementById("keys-page");
  if (!page) return;
  var api = page.getAttribute("data-api");
  var form = document.getElementById("key-form");
  var csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;

  function call(method, url, body) {
    var options = {method: method, credentials: "same-origin",
                   headers: {"Accept": "application/json", "X-CSRFToken": csrf}};
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    return fetch(url, options).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (data) {
        return {ok: response.ok, status: response.status, data: data};
      });
    });
  }

  function showErrors(error) {
    form.querySelectorAll("[data-error]").forEach(function (p) { p.hidden = true; p.textContent = ""; });
    form.querySelectorAll("[aria-invalid]").forEach(function (el) { el.removeAttribute("aria-invalid"); });
    if (!error) return;
    var field = (error.param || "").split(".")[0];
    var target = form.querySelector('[data-error="' + field + '"]') || document.getElementById("err-form");
    target.textContent = error.message || "The key could not be created.";
    target.hidden = false;
    var input = form.querySelector('[name="' + field + '"]');
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", target.id);
    }
  }

  function cell(row, text) {
    var td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function render(keys) {
    var tbody = page.querySelector("#keys-table tbody");
    tbody.textContent = "";
    keys.forEach(function (k) {
      var row = document.createElement("tr");
      cell(row, k.name);
      var code = document.createElement("code");
      code.textContent = "cai-" + k.prefix + "…";
      cell(row, "").appendChild(code);
      cell(row, k.created_at.slice(0, 10));
      cell(row, k.expires_at ? k.expires_at.slice(0, 10) : "never");
      cell(row, k.last_used_at ? k.last_used_at.slice(0, 16).replace("T", " ") : "never");
      cell(row, k.allowed_models.length ? k.allowed_models.join(", ") : "all");
      cell(row, k.project || "none");
      cell(row, k.state);
      var actions = cell(row, "");
      if (k.state !== "revoked") {
        var button = document.createElement("button");
        button.type = "button";
        button.className = "danger";
        button.setAttribute("data-revoke", k.prefix);
        button.setAttribute("aria-label", "Revoke " + k.name);
        button.textContent = "Revoke";
        actions.appendChild(button);
      }
      tbody.appendChild(row);
    });
    document.getElementById("keys-table").hidden = !keys.length;
    document.getElementById("no-keys").hidden = !!keys.length;
  }

  function reload() {
    return call("GET", api).then(function (r) { if (r.ok) render(r.data.data); });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var days = form.elements.expires_days.value.trim();
    var models = form.elements.models.value.split(/[\n,]/).map(function (m) { return m.trim(); })
      .filter(function (m) { return m; });
    var body = {name: form.elements.name.value.trim(), models: models,
                expires_days: days === "" ? null : (/^\d+$/.test(days) ? parseInt(days, 10) : days)};
    if (form.elements.project) body.project = form.elements.project.value;  // only users with projects have it
    var button = form.querySelector("button[type=submit]");
    button.disabled = true;
    call("POST", api, body).then(function (r) {
      if (!r.ok) {
        showErrors(r.data.error || {message: "The key could not be created (" + r.status + ")."});
        return;
      }
      showErrors(null);
      var box = document.getElementById("secret-template").content.cloneNode(true);
      box.querySelector('[data-field="name"]').textContent = r.data.name;
      box.querySelector("#new-secret").textContent = r.data.secret;
      var holder = document.getElementById("new-key");
      holder.textContent = "";
      holder.appendChild(box);
      form.elements.name.value = "";
      form.elements.models.value = "";
      return reload();
    }).catch(function () {
      showErrors({message: "The server could not be reached: try again."});
    }).then(function () { button.disabled = false; });
  });

  page.addEventListener("click", function (event) {
    var button = event.target.closest("[data-revoke]");
    if (!button) return;
    button.disabled = true;
    call("DELETE", api + "/" + encodeURIComponent(button.getAttribute("data-revoke"))).then(function (r) {
      if (!r.ok) showErrors(r.data.error || {message: "The key could not be revoked (" + r.status + ")."});
      return reload();
    }).catch(function () { button.disabled = false; });
  });
})();
