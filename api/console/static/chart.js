// Small SVG charts (no library): a line chart of per-step series and a horizontal bar chart.

import { fmtNum, h, svg } from './dom.js';

const COLORS = ['#2563eb', '#dc2626', '#059669', '#d97706', '#7c3aed'];

/** series: {name: number[]} → an SVG line chart, one line per series, each scaled to its own range. */
export function lineChart(series, { width = 560, height = 220, title = '' } = {}) {
  const names = Object.keys(series).filter((n) => Array.isArray(series[n]) && series[n].length > 0);
  const pad = { left: 48, right: 12, top: 12, bottom: 28 };
  const w = width - pad.left - pad.right;
  const hgt = height - pad.top - pad.bottom;
  const steps = Math.max(...names.map((n) => series[n].length), 2);
  const root = svg('svg', { viewBox: `0 0 ${width} ${height}`, class: 'chart', role: 'img', 'aria-label': title });
  root.append(svg('title', {}, title));
  root.append(svg('rect', { x: pad.left, y: pad.top, width: w, height: hgt, class: 'plot' }));
  names.forEach((name, i) => {
    const values = series[name].map(Number);
    const finite = values.filter(Number.isFinite);
    const lo = Math.min(...finite);
    const hi = Math.max(...finite);
    const span = hi - lo || 1;
    const points = values
      .map((v, j) => (Number.isFinite(v) ? `${pad.left + (j / (steps - 1)) * w},${pad.top + hgt - ((v - lo) / span) * hgt}` : null))
      .filter(Boolean)
      .join(' ');
    root.append(svg('polyline', { points, fill: 'none', stroke: COLORS[i % COLORS.length], 'stroke-width': 1.5 }));
    root.append(
      svg('text', { x: pad.left + 6, y: pad.top + 14 + 14 * i, fill: COLORS[i % COLORS.length], class: 'legend' },
        `${name}: ${fmtNum(values[0])} → ${fmtNum(values[values.length - 1])}`),
    );
  });
  root.append(svg('text', { x: pad.left, y: height - 8, class: 'axis' }, 'step 1'));
  root.append(svg('text', { x: width - pad.right, y: height - 8, class: 'axis', 'text-anchor': 'end' }, `step ${steps}`));
  return h('figure', { class: 'chart' }, root, title ? h('figcaption', {}, title) : null);
}

/** rows: [[label, value]] → horizontal bars scaled to the largest |value|. */
export function barChart(rows, { width = 560, title = '' } = {}) {
  const bar = 18;
  const gap = 8;
  const labelW = 170;
  const valueW = 90;
  const height = rows.length * (bar + gap) + gap;
  const max = Math.max(...rows.map(([, v]) => Math.abs(v)), 1e-12);
  const root = svg('svg', { viewBox: `0 0 ${width} ${height}`, class: 'chart', role: 'img', 'aria-label': title });
  root.append(svg('title', {}, title));
  rows.forEach(([label, value], i) => {
    const y = gap + i * (bar + gap);
    const len = (Math.abs(value) / max) * (width - labelW - valueW);
    root.append(svg('text', { x: labelW - 6, y: y + bar - 5, 'text-anchor': 'end', class: 'axis' }, label));
    root.append(svg('rect', { x: labelW, y, width: Math.max(len, 1), height: bar, fill: COLORS[i % COLORS.length] }));
    root.append(svg('text', { x: labelW + len + 6, y: y + bar - 5, class: 'axis' }, fmtNum(value)));
  });
  return h('figure', { class: 'chart' }, root, title ? h('figcaption', {}, title) : null);
}
