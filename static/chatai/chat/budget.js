// Token budgets in the chat: a warning once a budget that applies to the chat's requests (the current
// project's, a group's, the user's own) is 80 % used, read from GET /api/me (the server counts; the page
// only shows). It is read again when a reply ends and when the project changes. A request refused for
// budget shows the server's message (main.js), which names the budget and when it resets.
var box = document.getElementById("budget-warning");
var send = document.getElementById("send");
var project = document.getElementById("project");
var WARN_AT = 0.8;
var MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
              "November", "December"];

// "1 January": the reset day as the server's time zone has it (the date part of its ISO 8601 time).
export function resetDay(iso) {
  var m = /^(\d{4})-(\d{2})-(\d{2})/.exec(iso || "");
  return m ? Number(m[3]) + " " + MONTHS[Number(m[2]) - 1] : "";
}

export function budgetName(b) {
  var adjective = { day: "daily", week: "weekly", month: "monthly" }[b.period] || b.period;
  if (b.scope === "project") return "project " + b.owner + "'s " + adjective + " token budget";
  if (b.scope === "group") return "group " + b.owner + "'s " + adjective + " token budget (your own share)";
  return "your " + adjective + " token budget";
}

// The sentence for the most used budget at or past 80 %, or "" when none is.
export function warning(budgets) {
  var worst = null;
  (budgets || []).forEach(function (b) {
    var share = b.limit > 0 ? b.used / b.limit : 1;
    if (share >= WARN_AT && (!worst || share > worst.share)) worst = { b: b, share: share };
  });
  if (!worst) return "";
  var percent = Math.min(100, Math.floor(worst.share * 100));
  return "You have used " + percent + "% of " + budgetName(worst.b) + "; it resets on " +
    resetDay(worst.b.resets_at) + ".";
}

export function refresh() {
  if (!box) return Promise.resolve();
  return fetch("/api/me", { credentials: "same-origin", headers: { "Accept": "application/json" } })
    .then(function (r) { return r.ok ? r.json() : null; })
    .then(function (me) {
      if (!me) return;
      var text = warning(me.budgets);
      box.textContent = text;
      box.hidden = !text;
    })
    .catch(function () { /* the next reply tries again */ });
}

if (box) {
  refresh();
  // A reply ended (Send is shown again): what it cost is counted now.
  if (send) new MutationObserver(function () { if (!send.hidden) refresh(); })
    .observe(send, { attributes: true, attributeFilter: ["hidden"] });
  // Another project: its budget (project.js saves the choice, then re-enables the select).
  if (project) new MutationObserver(function () { if (!project.disabled) refresh(); })
    .observe(project, { attributes: true, attributeFilter: ["disabled"] });
}
