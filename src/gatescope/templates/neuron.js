// Renders the token windows of a gatescope neuron page from its JSON data. Tokens are
// inserted as text nodes only (corpus texts are untrusted), colored by one quantity on a
// diverging scale centered at 0: orange positive, blue negative (dotted underline too).
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("page-data").textContent);
  const names = ["g", "u", "act(g)", "act(g)·u"];
  let quantity = 3;

  // One scale per quantity: the largest |value| on the page.
  const scale = data.quantities.map((_, q) => {
    let m = 0;
    for (const t of Object.values(data.texts)) for (const v of t.values[q]) m = Math.max(m, Math.abs(v));
    return m || 1;
  });

  function signCase(g, u) {
    if (g === 0 || u === 0) return "no case (a zero)";
    return (g > 0 ? "gate+" : "gate-") + (u > 0 ? "_in+" : "_in-");
  }

  function color(v, q) {
    const x = Math.min(1, Math.abs(v) / scale[q]);
    const [r, g, b] = v >= 0 ? [230, 97, 1] : [33, 102, 172];
    const mix = (c) => Math.round(255 + (c - 255) * x);
    return { background: `rgb(${mix(r)}, ${mix(g)}, ${mix(b)})`, dark: x > 0.6 };
  }

  // Whitespace made visible: spaces as a dot, tabs as an arrow, newlines as a return sign
  // followed by the line break itself.
  function appendVisible(span, text) {
    const parts = text.split(/([ \t\n\r])/);
    for (const part of parts) {
      if (!part) continue;
      const visible = { " ": "·", "\t": "→", "\n": "↵", "\r": "␍" }[part];
      if (visible) {
        const ws = document.createElement("span");
        ws.className = "ws";
        ws.textContent = visible;
        span.appendChild(ws);
        if (part === "\n") span.appendChild(document.createTextNode("\n"));
      } else {
        span.appendChild(document.createTextNode(part));
      }
    }
  }

  // A routed expert's neuron: the router's weight of the token for the expert, or that
  // the expert did not get it (its values are 0 there, in no case).
  function routed(text, i) {
    if (!text.weights) return "";
    const w = text.weights[i];
    return w === null ? "\nnot routed to this expert" : `\nrouter weight ${w}`;
  }

  function render(box) {
    const text = data.texts[box.dataset.text];
    const position = Number(box.dataset.position);
    const full = box.dataset.full === "1";
    const from = full ? 0 : Math.max(0, position - data.before);
    const to = full ? text.tokens.length : Math.min(text.tokens.length, position + data.after + 1);
    box.replaceChildren();
    if (from > 0) box.appendChild(document.createTextNode("… "));
    const computed = text.values[0].length;
    for (let i = from; i < to; i++) {
      const span = document.createElement("span");
      if (i >= computed) {
        // After the last token the page's examples show: not computed (a causal model's
        // earlier tokens do not depend on it).
        span.className = "tok uncomputed";
        span.title = `token ${i}: after the examples, not computed`;
        appendVisible(span, text.tokens[i]);
        box.appendChild(span);
        continue;
      }
      const values = text.values.map((row) => row[i]);
      const v = values[quantity];
      const c = color(v, quantity);
      span.className = "tok" + (v < 0 ? " negative" : "") + (i === position ? " max" : "")
        + (text.weights && text.weights[i] === null ? " unrouted" : "");
      span.style.background = c.background;
      if (c.dark) span.style.color = "#fff";
      span.title = `token ${i}: ` + names.map((n, q) => `${n} = ${values[q]}`).join(", ")
        + `\ncase: ${signCase(values[0], values[1])}` + routed(text, i);
      appendVisible(span, text.tokens[i]);
      box.appendChild(span);
    }
    if (to < text.tokens.length) box.appendChild(document.createTextNode(" …"));
  }

  const boxes = Array.from(document.querySelectorAll(".tokens"));
  boxes.forEach(render);
  document.querySelectorAll("input[name=quantity]").forEach((input) => {
    input.addEventListener("change", () => {
      quantity = Number(input.value);
      boxes.forEach(render);
    });
  });
  document.querySelectorAll("button.expand").forEach((button) => {
    button.addEventListener("click", () => {
      const box = button.closest(".example").querySelector(".tokens");
      box.dataset.full = box.dataset.full === "1" ? "0" : "1";
      button.textContent = box.dataset.full === "1" ? "window" : "full text";
      render(box);
    });
  });
})();
