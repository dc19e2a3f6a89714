// Conversations and settings in this browser only (IndexedDB). One database per user of this
// browser, named after the user id (not the name, which SSO may reuse): another account signed in
// here later never sees these conversations.
// The store answers at once; each call waits for the database (and fails as it does, if it cannot open).
export function openStore(name) {
  var ready = openDb(name);
  function tx(store, mode, fn) {
    return ready.then(function (db) {
      return new Promise(function (resolve, reject) {
        var t = db.transaction(store, mode), result;
        var s = t.objectStore(store);
        var req = fn(s);
        if (req) req.onsuccess = function () { result = req.result; };
        t.oncomplete = function () { resolve(result); };
        t.onerror = function () { reject(t.error); };
        t.onabort = function () { reject(t.error); };
      });
    });
  }
  return {
    ready: ready,
    all: function () { return tx("conversations", "readonly", function (s) { return s.getAll(); }); },
    put: function (c) { return tx("conversations", "readwrite", function (s) { return s.put(c); }); },
    remove: function (id) { return tx("conversations", "readwrite", function (s) { return s.delete(id); }); },
    get: function (k) { return tx("settings", "readonly", function (s) { return s.get(k); }); },
    set: function (k, v) { return tx("settings", "readwrite", function (s) { return s.put(v, k); }); },
    clear: function () {
      return Promise.all([tx("conversations", "readwrite", function (s) { return s.clear(); }),
                          tx("settings", "readwrite", function (s) { return s.clear(); })]);
    }
  };
}

function openDb(name) {
  return new Promise(function (resolve, reject) {
    if (!name) { reject(new Error("no user")); return; }
    var req = indexedDB.open(name, 1);
    req.onupgradeneeded = function () {
      var d = req.result;
      if (!d.objectStoreNames.contains("conversations")) d.createObjectStore("conversations", { keyPath: "id" });
      if (!d.objectStoreNames.contains("settings")) d.createObjectStore("settings");
    };
    req.onsuccess = function () {
      // "Forget my chats" (sign-out, any tab) deletes the database: let go of it when asked.
      req.result.onversionchange = function () { req.result.close(); };
      resolve(req.result);
    };
    req.onerror = function () { reject(req.error); };
  });
}
