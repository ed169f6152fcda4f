// The model / layer / neuron picker of a gatescope site index, over the pages it lists.
(function () {
  "use strict";
  const links = Array.from(document.querySelectorAll("ul.pages a"));
  const form = document.getElementById("picker");
  const select = (name) => form.elements[name];

  // values: [value, label] pairs, or values shown as they are.
  function fill(name, values) {
    const box = select(name);
    box.replaceChildren();
    for (const item of values) {
      const [value, label] = Array.isArray(item) ? item : [item, item];
      const option = document.createElement("option");
      option.value = value;
      option.textContent = label;
      box.appendChild(option);
    }
  }
  const unique = (xs) => Array.from(new Set(xs));
  const matching = () => links.filter((a) => a.dataset.model === select("model").value);

  function onModel() {
    fill("layer", unique(matching().map((a) => a.dataset.layer)));
    onLayer();
  }
  function onLayer() {
    // A mixture of experts' neurons read expert.neuron (data-label), their value the index.
    fill("neuron", matching().filter((a) => a.dataset.layer === select("layer").value)
      .map((a) => [a.dataset.neuron, a.dataset.label]));
  }
  fill("model", unique(links.map((a) => a.dataset.model)));
  onModel();
  select("model").addEventListener("change", onModel);
  select("layer").addEventListener("change", onLayer);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const link = matching().find((a) => a.dataset.layer === select("layer").value
      && a.dataset.neuron === select("neuron").value);
    if (link) window.location.href = link.getAttribute("href");
  });
})();
