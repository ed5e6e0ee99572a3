"""The report page's inline stylesheet and scripts (string constants: no template files).

``ERROR_TRAP`` runs first, in ``<head>``: it records uncaught errors, unhandled rejections
and ``console.error`` calls into ``<pre id="console-errors">`` so a DOM dump shows them.
``SCRIPT`` adds the interactions (hover highlighting across sections, iteration and draft
toggles) and marks ``<body data-js="ready">`` when it ran through; the content itself is all
static HTML, so the page reads the same without script.
"""
from __future__ import annotations

__all__ = ["CSS", "ERROR_TRAP", "SCRIPT"]

CSS = """
:root { --fg:#1d232a; --muted:#66707a; --line:#d7dce1; --bg:#fff; --panel:#f6f8fa;
  --acc:#2e8b57; --bonus:#d4860b; --rej:#c0392b; --commit:#2f6fb5; --hl:#ffe066; }
* { box-sizing: border-box; }
body { margin: 0; padding: 20px 28px 60px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--fg); background: var(--bg); }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 0 0 8px; }
section { margin: 18px 0; padding: 14px 16px; border: 1px solid var(--line); border-radius: 8px; }
.muted, .note { color: var(--muted); font-size: 12.5px; }
#meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0 0; }
#meta dt { color: var(--muted); } #meta dd { margin: 0; }
pre { margin: 0; white-space: pre-wrap; word-break: break-word;
  font: 12.5px/1.45 ui-monospace, Menlo, Consolas, monospace; }
#prompt, #output-text { background: var(--panel); padding: 8px 10px; border-radius: 6px; }
#summary .stats { display: flex; flex-wrap: wrap; gap: 10px; }
.stat { background: var(--panel); border-radius: 6px; padding: 6px 12px; min-width: 110px; }
.stat .label { display: block; color: var(--muted); font-size: 12px; }
.stat .value { font-size: 18px; font-weight: 600; }
.tokens { display: flex; flex-wrap: wrap; gap: 3px; align-items: center; }
.token { font: 12.5px/1.3 ui-monospace, Menlo, Consolas, monospace; white-space: pre; padding: 1px 4px;
  border-radius: 4px; border: 1px solid transparent; background: #eef1f4; cursor: default; }
.token[data-state=committed] { background: #e3edf8; border-color: #b7cde6; }
.token[data-state=bonus] { background: #fdf0d9; border-color: var(--bonus); }
.token[data-state=accepted] { background: #e2f3e9; border-color: #9fd2b3; }
.token[data-state=unmasked] { background: #e2f3e9; border-color: #9fd2b3; }
.token[data-state=rejected], .token[data-state=clipped], .token[data-state=discarded] {
  background: #fbe9e7; border-color: #f0b7b0; color: var(--rej); text-decoration: line-through; }
.token.hl, .node.hl rect { outline: 2px solid var(--hl); background: var(--hl); fill: var(--hl); }
.legend { display: flex; gap: 10px; flex-wrap: wrap; margin: 6px 0 10px; }
.controls { margin: 4px 0 10px; display: flex; gap: 14px; align-items: center; }
button { font: inherit; padding: 2px 10px; border: 1px solid var(--line); background: var(--panel);
  border-radius: 5px; cursor: pointer; }
.iteration, .join { border-top: 1px solid var(--line); padding: 6px 0; }
.iteration.hl, .join.hl { background: #fffbe6; }
.iteration > header, .join > header { display: flex; gap: 12px; align-items: baseline; cursor: pointer; }
.iteration > header .title { font-weight: 600; min-width: 110px; }
.iteration.collapsed .body, .join.collapsed .body { display: none; }
.body .line { display: grid; grid-template-columns: 190px 1fr; gap: 8px; margin: 3px 0; align-items: start; }
.body .line > .what { color: var(--muted); font-size: 12.5px; overflow: hidden; text-overflow: ellipsis; }
body.hide-rejected .draft-line .token[data-state=rejected] { display: none; }
.canvas { display: flex; flex-wrap: wrap; gap: 1px; }
.cell { width: 9px; height: 12px; border-radius: 2px; background: #dfe3e8; }
.cell[data-s=earlier] { background: #9fb9d8; } .cell[data-s=now] { background: var(--acc); }
.cell[data-s=eos] { background: #f2f2f2; }
.scroll { overflow: auto; max-height: 720px; border: 1px solid var(--line); border-radius: 6px; }
svg text { font: 11px ui-monospace, Menlo, Consolas, monospace; fill: var(--fg); }
#ddg-svg .node rect { fill: #e3edf8; stroke: #7fa6d3; }
#ddg-svg .node[data-state=bonus] rect { fill: #fdf0d9; stroke: var(--bonus); }
#ddg-svg .prompt-node rect { fill: #eceff3; stroke: #9aa4ae; }
#ddg-svg .node text, #ddg-svg .col-label { text-anchor: middle; }
#ddg-svg .row-label, #acceptance-svg .tick { text-anchor: end; fill: var(--muted); }
#ddg-svg .col-label { fill: var(--muted); }
#ddg-svg .col-bg { fill: transparent; } #ddg-svg .col-bg.hl { fill: #fff6cc; }
#ddg-svg .edge { fill: none; stroke: #8a96a3; stroke-width: 1.2; }
#ddg-svg .edge.cross { stroke: var(--rej); stroke-opacity: .65; }
#ddg-svg .arrow-head { fill: #6b7680; }
#ddg-svg .node.hl rect { fill: var(--hl); }
#acceptance-svg .drafted { fill: none; stroke: #9aa4ae; stroke-dasharray: 3 2; }
#acceptance-svg .acc { fill: var(--acc); } #acceptance-svg .bonus { fill: var(--bonus); }
#acceptance-svg .bar.hl rect { opacity: .6; }
#acceptance-svg .grid { stroke: #eceff3; } #acceptance-svg .mean { stroke: var(--commit); stroke-dasharray: 5 3; }
#acceptance-svg .mean-label { text-anchor: end; fill: var(--commit); }
#acceptance-svg .axis-label { text-anchor: middle; fill: var(--muted); }
.ir-pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.ir-pair figure { margin: 0; min-width: 0; } .ir-pair figcaption { font-weight: 600; margin-bottom: 4px; }
.ir-pair pre { background: var(--panel); padding: 8px; border-radius: 6px; overflow-x: auto; white-space: pre; }
.ir-line.added { background: #e2f3e9; } .ir-line.removed { background: #fbe9e7; }
#console-errors:empty { display: none; }
#console-errors { color: var(--rej); border: 1px solid var(--rej); padding: 8px; border-radius: 6px; }
"""

ERROR_TRAP = """
(function () {
  var errors = [];
  function flush() {
    var el = document.getElementById("console-errors");
    if (el) { el.textContent = errors.join("\\n"); }
  }
  function record(text) { errors.push(String(text)); flush(); }
  window.addEventListener("error", function (e) {
    record("error: " + (e.message || (e.target && e.target.outerHTML) || e));
  }, true);
  window.addEventListener("unhandledrejection", function (e) { record("unhandled rejection: " + e.reason); });
  var original = console.error;
  console.error = function () {
    record("console.error: " + Array.prototype.slice.call(arguments).join(" "));
    return original.apply(console, arguments);
  };
  document.addEventListener("DOMContentLoaded", flush);
})();
"""

SCRIPT = """
(function () {
  "use strict";
  var trace = JSON.parse(document.getElementById("trace-data").textContent);
  function all(sel) { return Array.prototype.slice.call(document.querySelectorAll(sel)); }
  function mark(sel, on) { all(sel).forEach(function (el) { el.classList.toggle("hl", on); }); }
  function hover(el, on) {
    var pos = el.getAttribute("data-pos"), col = el.getAttribute("data-col");
    if (pos !== null && pos !== "") {
      mark('.token[data-pos="' + pos + '"], #ddg-svg .node[data-pos="' + pos + '"]', on);
    }
    if (col !== null && col !== "") {
      var c = '[data-col="' + col + '"]';
      mark(".iteration" + c + ", .join" + c + ", #ddg-svg .col-bg" + c + ", #acceptance-svg .bar" + c, on);
    }
  }
  all("[data-pos], [data-col]").forEach(function (el) {
    el.addEventListener("mouseenter", function () { hover(el, true); });
    el.addEventListener("mouseleave", function () { hover(el, false); });
  });
  all(".iteration > header, .join > header").forEach(function (h) {
    h.addEventListener("click", function () { h.parentNode.classList.toggle("collapsed"); });
  });
  var iters = all(".iteration, .join");
  var toggle = document.getElementById("toggle-iterations");
  toggle.addEventListener("click", function () {
    var open = iters.some(function (it) { return !it.classList.contains("collapsed"); });
    iters.forEach(function (it) { it.classList.toggle("collapsed", open); });
    toggle.textContent = open ? "expand all" : "collapse all";
  });
  var rejected = document.getElementById("toggle-rejected");
  rejected.addEventListener("change", function () {
    document.body.classList.toggle("hide-rejected", !rejected.checked);
  });
  all("#acceptance-svg .bar").forEach(function (bar) {
    bar.addEventListener("click", function () {
      var it = document.querySelector('.iteration[data-col="' + bar.getAttribute("data-col") + '"]');
      if (it) { it.classList.remove("collapsed"); it.scrollIntoView({block: "center"}); }
    });
  });
  var steps = trace.records.filter(function (r) { return r.kind !== "prefill"; }).length;
  document.getElementById("js-status").textContent =
    "interactive: hover a token or an iteration to highlight it everywhere (" + steps + " trace records)";
  document.body.setAttribute("data-js", "ready");
})();
"""
