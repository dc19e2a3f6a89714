// The chat's project: which of the user's projects its requests are charged to. The choice is kept in
// the session on the server (PUT /api/me/project), so the chat's next /v1 request, every open tab and
// the next page load use it; the page lists the user's projects (rendered by the server).
var select = document.getElementById("project");
var status = document.getElementById("project-status");
var CSRF = document.querySelector('meta[name="csrf-token"]').content;

function choose(name) {
  return fetch(select.dataset.api, {
    method: "PUT", credentials: "same-origin", body: JSON.stringify({ project: name }),
    headers: { "Accept": "application/json", "Content-Type": "application/json", "X-CSRFToken": CSRF }
  }).then(function (r) {
    return r.json().catch(function () { return {}; }).then(function (body) {
      if (!r.ok) throw new Error((body.error && body.error.message) || ("HTTP " + r.status));
      return body.project;
    });
  });
}

if (select) {
  var saved = select.value;
  select.dataset.saved = saved;
  select.addEventListener("change", function () {
    var wanted = select.value;
    select.disabled = true;
    status.textContent = "";
    choose(wanted).then(function (now) {
      saved = now;
      status.textContent = "Charged to " + now;
    }).catch(function (e) {
      status.textContent = "The project was not changed: " + e.message;
    }).then(function () {
      select.value = saved;
      select.dataset.saved = saved;
      select.disabled = false;
    });
  });
}
