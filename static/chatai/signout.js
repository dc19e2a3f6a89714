// Signing out can forget this user's conversations on this computer: their IndexedDB database
// (named after the user id, see chat.js) is deleted before the sign-out is sent.
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("signout"), box = document.getElementById("forget-chats");
    var name = document.body.dataset.chatDb;
    if (!form || !box || !name) return;
    var sent = false;
    form.addEventListener("submit", function (e) {
      if (!box.checked || sent) return;
      e.preventDefault();
      sent = true;
      var go = function () { form.submit(); };
      var req;
      try { req = indexedDB.deleteDatabase(name); } catch (err) { go(); return; }
      req.onsuccess = go;
      req.onerror = function () {
        sent = false;
        window.alert("This browser did not delete your chats (" + req.error + "); you are still signed in.");
      };
      // An open chat tab closes its connection on request (versionchange); a tab that does not
      // keeps the deletion pending, and it completes when that tab closes.
      req.onblocked = function () { setTimeout(go, 3000); };
    });
  });
})();
