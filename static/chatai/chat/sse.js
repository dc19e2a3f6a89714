// Server-sent events read from a fetch() response body: whole events only (a partial one waits for
// its blank line), each line handed on as a comment (": queued (12s)", cold-start progress) or as
// the payload of a "data: " line.
export function readEvents(body, on) {
  var reader = body.getReader(), decoder = new TextDecoder(), buffer = "";
  function pump() {
    return reader.read().then(function (chunk) {
      if (chunk.done) return;
      buffer += decoder.decode(chunk.value, { stream: true });
      var cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        var block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        block.split("\n").forEach(function (line) {
          if (line.indexOf(": ") === 0) on.comment(line.slice(2));
          else if (line.indexOf("data: ") === 0) on.data(line.slice(6));
        });
      }
      return pump();
    });
  }
  return pump();
}
