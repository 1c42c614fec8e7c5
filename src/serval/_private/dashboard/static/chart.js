// A small SVG line chart: serval's own, so that the page fetches nothing from elsewhere.
// lineChart(svg, series, options): series = [{name, color, values: [[t_seconds, v|null]]}],
// options = {windowS, title, now}. The svg gets data-points = how many values it draws.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const exp = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * exp) return m * exp;
  return 10 * exp;
}

function fmt(v) {
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2).replace(/\.?0+$/, "") || "0";
}

function lineChart(svg, series, options) {
  const width = 360, height = 150, left = 44, right = 8, top = 20, bottom = 22;
  const windowS = options.windowS || 600;
  const now = options.now || Date.now() / 1000;
  const t0 = now - windowS;
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", options.title || "chart");

  let max = 0, drawn = 0;
  for (const s of series) for (const [t, v] of s.values) if (t >= t0 && v !== null && v > max) max = v;
  max = niceMax(max);
  const x = (t) => left + ((t - t0) / windowS) * (width - left - right);
  const y = (v) => top + (1 - v / max) * (height - top - bottom);

  svg.appendChild(svgEl("text", {x: left, y: 13, class: "chart-title"}, options.title || ""));
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4, yy = y(v);
    svg.appendChild(svgEl("line", {x1: left, x2: width - right, y1: yy, y2: yy, class: "grid"}));
    svg.appendChild(svgEl("text", {x: left - 4, y: yy + 3, class: "axis", "text-anchor": "end"}, fmt(v)));
  }
  const step = [10, 15, 30, 60, 120, 300].find((s) => windowS / s <= 6) || 600;
  for (let ago = 0; ago <= windowS; ago += step) {
    const label = ago === 0 ? "now" : ago % 60 === 0 ? `-${ago / 60}m` : `-${ago}s`;
    svg.appendChild(svgEl("text", {x: x(now - ago), y: height - 6, class: "axis", "text-anchor": "middle"}, label));
  }
  let legendX = width - right;
  for (const s of [...series].reverse()) {
    const label = svgEl("text", {x: legendX, y: 13, class: "legend", "text-anchor": "end", fill: s.color}, s.name);
    svg.appendChild(label);
    legendX -= 8 + 6.2 * s.name.length;
  }
  for (const s of series) {
    let path = "", pen = false;
    for (const [t, v] of s.values) {
      if (t < t0 || v === null) { pen = false; continue; }
      path += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(Math.min(v, max)).toFixed(1)}`;
      pen = true;
      drawn++;
    }
    if (path) svg.appendChild(svgEl("path", {d: path, stroke: s.color, class: "line"}));
  }
  svg.dataset.points = String(drawn);
}
