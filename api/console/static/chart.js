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

/**
 * points: [{round, mean, min, max, std}] → a per-round chart: the mean as a line with dots, the spread
 * across clients (min–max) as a band. The y axis is [0, 1] when every value lies there (accuracies),
 * else the values' own range.
 */
export function roundChart(points, { width = 640, height = 240, title = '', label = 'mean' } = {}) {
  const pad = { left: 44, right: 14, top: 14, bottom: 30 };
  const w = width - pad.left - pad.right;
  const hgt = height - pad.top - pad.bottom;
  const all = points.flatMap((p) => [p.min, p.max, p.mean]).filter(Number.isFinite);
  const unit = all.length > 0 && all.every((v) => v >= 0 && v <= 1);
  let lo = unit ? 0 : Math.min(...all);
  let hi = unit ? 1 : Math.max(...all);
  if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
  const first = points.length ? points[0].round : 1;
  const last = points.length ? points[points.length - 1].round : 1;
  const x = (r) => pad.left + (last > first ? ((r - first) / (last - first)) * w : w / 2);
  const y = (v) => pad.top + hgt - ((v - lo) / (hi - lo)) * hgt;
  const root = svg('svg', { viewBox: `0 0 ${width} ${height}`, class: 'chart', role: 'img', 'aria-label': title });
  root.append(svg('title', {}, title));
  root.append(svg('rect', { x: pad.left, y: pad.top, width: w, height: hgt, class: 'plot' }));
  for (const t of [lo, (lo + hi) / 2, hi]) {
    root.append(svg('line', { x1: pad.left, x2: pad.left + w, y1: y(t), y2: y(t), class: 'grid' }));
    root.append(svg('text', { x: pad.left - 6, y: y(t) + 4, class: 'axis', 'text-anchor': 'end' }, String(Number(t.toPrecision(3)))));
  }
  if (points.length > 1) {
    const upper = points.map((p) => `${x(p.round)},${y(p.max)}`);
    const lower = points.slice().reverse().map((p) => `${x(p.round)},${y(p.min)}`);
    root.append(svg('polygon', { points: [...upper, ...lower].join(' '), class: 'band', 'data-testid': 'spread-band' }));
    root.append(svg('polyline', { points: points.map((p) => `${x(p.round)},${y(p.mean)}`).join(' '), class: 'mean' }));
  }
  for (const p of points) {
    root.append(svg('line', { x1: x(p.round), x2: x(p.round), y1: y(p.min), y2: y(p.max), class: 'whisker' }));
    root.append(svg('circle', { cx: x(p.round), cy: y(p.mean), r: 3.5, class: 'dot', 'data-round': p.round, 'data-mean': p.mean },
      svg('title', {}, `round ${p.round}: ${label} ${fmtNum(p.mean)} (min ${fmtNum(p.min)}, max ${fmtNum(p.max)}, std ${fmtNum(p.std)})`)));
  }
  const ticks = last > first ? [[first, 'start'], [last, 'end']] : [[first, 'middle']];
  for (const [r, anchor] of ticks) root.append(svg('text', { x: x(r), y: height - 10, class: 'axis', 'text-anchor': anchor }, `round ${r}`));
  return h('figure', { class: 'chart' }, root, title ? h('figcaption', {}, title) : null);
}
