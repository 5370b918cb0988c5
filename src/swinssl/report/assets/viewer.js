// swinssl report: the case viewer (NiiVue, inlined above as window.niivue) and the sortable tables.
// The page's data is the JSON in the script element with id report-data; each volume is a gzipped
// NIfTI, base64, in a script element of type application/octet-stream, decoded only when its case is
// shown. The body's data-viewer attribute says where the viewer is: loading, ready (drawn), message
// (a problem is shown instead of, or above, the images) or none (no cases on this page); once drawn,
// data-canvas holds the canvas's place on the page (x,y,width,height in CSS pixels).
"use strict";
(function () {
  const report = JSON.parse(document.getElementById("report-data").textContent);
  const body = document.body;
  const state = { index: -1, hiddenClasses: new Set(), layerOn: {}, opacity: {}, layerVolumes: [] };
  let nv = null;

  function $(id) {
    return document.getElementById(id);
  }

  function say(text) {
    const box = $("viewer-message");
    box.textContent = text;
    box.hidden = !text;
  }

  function labelColormap() {
    // One discrete colour per class; a hidden class gets alpha 0. Background (0) is transparent.
    const cm = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: ["background"] };
    for (const c of report.classes) {
      cm.I.push(c.value);
      cm.R.push(c.color[0]);
      cm.G.push(c.color[1]);
      cm.B.push(c.color[2]);
      cm.A.push(state.hiddenClasses.has(c.value) ? 0 : 255);
      cm.labels.push(c.name);
    }
    return cm;
  }

  function applyLayers() {
    for (const { name, volume } of state.layerVolumes) {
      volume.setColormapLabel(labelColormap());
      const on = state.layerOn[name] !== false;
      nv.setOpacity(nv.volumes.indexOf(volume), on ? state.opacity[name] : 0);
    }
    nv.updateGLVolume();
  }

  async function loadVolume(id, name, opacity) {
    const holder = $(id);
    if (!holder) throw new Error("its data is not on this page");
    return niivue.NVImage.loadFromBase64({ base64: holder.textContent.trim(), name: name + ".nii.gz",
                                           colormap: "gray", opacity: opacity });
  }

  function esc(text) {
    const span = document.createElement("span");
    span.textContent = String(text);
    return span.innerHTML;
  }

  function fmt(value, digits) {
    return value === null || value === undefined ? "" : Number(value).toFixed(digits);
  }

  function showScores(entry) {
    const box = $("case-scores");
    if (!entry.scores.length) {
      box.innerHTML = "<p class=\"muted\">No scores for this case (no labels or evaluation).</p>";
      return;
    }
    const rows = entry.scores.map((s) =>
      `<tr><td>${esc(s.layer)}</td><td>${esc(s.class_name)}</td><td>${fmt(s.dice, 3)}</td><td>${fmt(s.hd95, 1)}</td>` +
      `<td>${fmt(s.nsd, 3)}</td></tr>`).join("");
    box.innerHTML = "<table class=\"scores\"><thead><tr><th>layer</th><th>class</th><th>Dice</th>" +
      "<th>HD95 mm</th><th>NSD</th></tr></thead><tbody>" + rows + "</tbody></table>";
  }

  async function showCase(index) {
    const entry = report.cases[index];
    state.index = index;
    $("case-select").value = String(index);
    $("case-info").textContent = entry.info;
    showScores(entry);
    body.dataset.viewer = "loading";
    say("");
    while (nv.volumes.length) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
    state.layerVolumes = [];
    const problems = entry.problems.slice();
    const canvasBox = $("canvas-box");
    if (!entry.image) {
      canvasBox.hidden = true;
      say(`Case ${entry.id} cannot be shown: ${problems.join("; ")}`);
      body.dataset.viewer = "message";
      return;
    }
    canvasBox.hidden = false;
    try {
      nv.addVolume(await loadVolume(entry.image, entry.id, 1));
    } catch (err) {
      canvasBox.hidden = true;
      say(`Case ${entry.id} cannot be shown: its image could not be read (${err.message}).`);
      body.dataset.viewer = "message";
      return;
    }
    for (const layer of entry.layers) {
      if (!layer.volume) {
        problems.push(`${layer.name}: ${layer.problem}`);
        continue;
      }
      try {
        const volume = await loadVolume(layer.volume, `${entry.id}_${layer.name}`, 0);
        nv.addVolume(volume);
        state.layerVolumes.push({ name: layer.name, volume: volume });
      } catch (err) {
        problems.push(`${layer.name}: could not be read (${err.message})`);
      }
    }
    applyLayers();
    if (entry.centre) {
      nv.scene.crosshairPos = nv.mm2frac(entry.centre);
      nv.createOnLocationChange();
    }
    nv.drawScene();
    if (problems.length) say(`Not shown for case ${entry.id}: ${problems.join("; ")}`);
    requestAnimationFrame(() => {
      const box = $("viewer-canvas").getBoundingClientRect();
      body.dataset.canvas = [box.left + window.scrollX, box.top + window.scrollY, box.width, box.height]
        .map(Math.round).join(",");
      body.dataset.viewer = problems.length ? "message" : "ready";
    });
  }

  function setView(view) {
    const types = { axial: nv.sliceTypeAxial, coronal: nv.sliceTypeCoronal, sagittal: nv.sliceTypeSagittal,
                    render: nv.sliceTypeRender, planes: nv.sliceTypeMultiplanar };
    nv.setSliceType(types[view]);
    for (const button of document.querySelectorAll("#view-buttons button")) {
      button.classList.toggle("active", button.dataset.view === view);
    }
  }

  function wireControls() {
    $("case-select").addEventListener("change", (event) => showCase(Number(event.target.value)));
    for (const button of document.querySelectorAll("#view-buttons button")) {
      button.addEventListener("click", () => setView(button.dataset.view));
    }
    for (const box of document.querySelectorAll("input[data-layer]")) {
      state.layerOn[box.dataset.layer] = box.checked;
      box.addEventListener("change", () => {
        state.layerOn[box.dataset.layer] = box.checked;
        applyLayers();
      });
    }
    for (const slider of document.querySelectorAll("input[data-layer-opacity]")) {
      state.opacity[slider.dataset.layerOpacity] = Number(slider.value);
      slider.addEventListener("input", () => {
        state.opacity[slider.dataset.layerOpacity] = Number(slider.value);
        applyLayers();
      });
    }
    for (const box of document.querySelectorAll("input[data-class]")) {
      box.addEventListener("change", () => {
        const value = Number(box.dataset.class);
        if (box.checked) state.hiddenClasses.delete(value);
        else state.hiddenClasses.add(value);
        applyLayers();
      });
    }
  }

  function caseFromHash() {
    const match = /case=([^&]+)/.exec(window.location.hash);
    if (!match) return 0;
    const found = report.cases.findIndex((c) => c.id === decodeURIComponent(match[1]));
    return found < 0 ? 0 : found;
  }

  function hiddenFromHash() {
    // A link may hide classes: report.html#case=ID&hide=2,4
    const match = /hide=([0-9,]+)/.exec(window.location.hash);
    for (const value of match ? match[1].split(",") : []) {
      const box = document.querySelector(`input[data-class="${Number(value)}"]`);
      if (box) box.checked = false;
      state.hiddenClasses.add(Number(value));
    }
  }

  async function startViewer() {
    if (!report.cases.length) {
      body.dataset.viewer = "none";
      return;
    }
    wireControls();
    hiddenFromHash();
    if (typeof niivue === "undefined") {
      $("canvas-box").hidden = true;
      say("The 3D viewer cannot start: its library (NiiVue) is missing from this page.");
      window.recordReportError("NiiVue is not loaded");
      body.dataset.viewer = "message";
      return;
    }
    nv = new niivue.Niivue({
      backColor: [0, 0, 0, 1],
      crosshairColor: [0.3, 0.6, 1.0, 0.9],
      crosshairWidth: 0.5,
      crosshairWidthUnit: "percent",
      show3Dcrosshair: true,
      isColorbar: false,
      multiplanarShowRender: niivue.SHOW_RENDER.ALWAYS,
      multiplanarLayout: niivue.MULTIPLANAR_TYPE.GRID,
      dragAndDropEnabled: false,
    });
    await nv.attachToCanvas($("viewer-canvas"));
    setView("planes");
    for (const link of document.querySelectorAll("a.case-link")) {
      link.addEventListener("click", () => {
        $("viewer").scrollIntoView();
        showCase(Number(link.dataset.case));
      });
    }
    await showCase(caseFromHash());
  }

  function sortable(table) {
    const headers = Array.from(table.querySelectorAll("th"));
    headers.forEach((th, column) => {
      th.addEventListener("click", () => {
        const ascending = th.dataset.order !== "asc";
        headers.forEach((h) => delete h.dataset.order);
        th.dataset.order = ascending ? "asc" : "desc";
        const tbody = table.tBodies[0];
        const rows = Array.from(tbody.rows);
        const key = (row) => {
          const cell = row.cells[column];
          const text = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent;
          const number = Number(text);
          return text !== "" && !Number.isNaN(number) ? number : text.toLowerCase();
        };
        rows.sort((a, b) => {
          const x = key(a), y = key(b);
          const order = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : typeof x === "number" ? -1 : 1;
          return ascending ? order : -order;
        });
        rows.forEach((row) => tbody.appendChild(row));
      });
    });
  }

  for (const table of document.querySelectorAll("table.sortable")) sortable(table);
  startViewer().catch((err) => {
    say(`The 3D viewer stopped: ${err.message}`);
    window.recordReportError("viewer: " + err.message);
    body.dataset.viewer = "message";
  });
})();
