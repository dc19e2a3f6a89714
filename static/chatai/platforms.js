// The staff's platform view: links and models, live over the same WebSocket as the chat page.
(function () {
  "use strict";
  var platformRows = document.getElementById("platform-rows");
  var modelRows = document.getElementById("model-rows");
  var state = document.getElementById("live-state");

  function row(cells) {
    var tr = document.createElement("tr");
    cells.forEach(function (text) {
      var td = document.createElement("td");
      td.textContent = text === undefined || text === null ? "" : String(text);
      tr.appendChild(td);
    });
    return tr;
  }

  function show(msg) {
    platformRows.replaceChildren.apply(platformRows, (msg.platforms || []).map(function (p) {
      return row([p.name, p.up ? "up" : "down", p.connections, p.streams, p.last_error]);
    }));
    modelRows.replaceChildren.apply(modelRows, (msg.models || []).map(function (m) {
      var tr = row([m.id, m.status, m.instances, m.demand, (m.platforms || []).join(", ")]);
      tr.dataset.model = m.id;
      tr.dataset.status = m.status;
      return tr;
    }));
  }

  function connect() {
    var ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws/status/");
    ws.onopen = function () { state.textContent = "live"; document.body.dataset.live = "1"; };
    ws.onmessage = function (ev) { var msg = JSON.parse(ev.data); if (msg.type === "status") show(msg); };
    ws.onclose = function (ev) {
      delete document.body.dataset.live;
      state.textContent = ev.code === 4401 ? "signed out" : "reconnecting…";
      if (ev.code !== 4401) setTimeout(connect, 2000);
    };
  }
  connect();
})();
