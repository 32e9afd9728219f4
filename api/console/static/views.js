// The console's pages. Each view gets (main, ctx, params): ctx.every(ms, fn) polls while the page is
// shown, ctx.objectURL(blob) makes a blob: URL revoked when the page goes, ctx.alive() says it is shown.

import { ApiError, deleteJSON, getBlob, getJSON, postJSON, probe, seg } from './api.js';
import { barChart, lineChart, roundChart } from './chart.js';
import { fmtBytes, fmtNum, fmtSeconds, fmtTime, h, kvTable, note } from './dom.js';

const METHODS = ['fedktl', 'fedktl-latents', 'fedproto', 'fedtgp', 'fd'];
const FINAL_ROUND = new Set(['published', 'failed']);
const FINAL_JOB = new Set(['done', 'failed', 'cancelled']);
const TIMELINE_ROUNDS = 25;

const fedPath = (fid) => `/v1/federations/${seg(fid)}`;
const roundPath = (fid, r) => `${fedPath(fid)}/rounds/${seg(r)}`;
const describe = (e) => (e instanceof ApiError ? e.describe() : String(e));

function badge(state) {
  return h('span', { class: `badge state-${state}`, 'data-testid': 'state' }, state);
}

/** A button that runs an async action, disabled while it runs; errors go to `status`. */
function actionButton(label, action, status, attrs = {}) {
  const button = h('button', { type: 'button', ...attrs }, label);
  button.addEventListener('click', async () => {
    button.disabled = true;
    try {
      await action();
    } catch (e) {
      status.replaceChildren(note('error', describe(e)));
    } finally {
      button.disabled = false;
    }
  });
  return button;
}

/** A button that asks for a second click before it acts (no dialog). */
function confirmButton(label, confirmLabel, action, status, attrs = {}) {
  let armed = false;
  const button = actionButton(label, async () => {
    if (!armed) {
      armed = true;
      button.textContent = confirmLabel;
      button.classList.add('danger');
      return;
    }
    await action();
  }, status, attrs);
  return button;
}

function section(title, ...children) {
  return h('section', { class: 'card' }, h('h2', {}, title), ...children);
}

// -- sign-in ---------------------------------------------------------------------------------------------

export function signInView(main, { onSignedIn, message }) {
  const input = h('input', {
    type: 'password', id: 'token', name: 'token', autocomplete: 'off', required: true,
    'data-testid': 'token', placeholder: 'ktl_…',
  });
  const status = h('div', { 'data-testid': 'signin-status' }, message ? note('error', message) : null);
  const form = h('form', { class: 'card signin', 'data-testid': 'signin' },
    h('h1', {}, 'Sign in'),
    h('p', {}, 'The admin token (KTL_ADMIN_TOKEN). It is kept in this tab only and sent as a bearer header.'),
    h('label', { for: 'token' }, 'Admin token'), input,
    h('button', { type: 'submit' }, 'Sign in'), status);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    status.replaceChildren(note('info', 'checking…'));
    try {
      await getJSON('/v1/federations?limit=1', { token });
      onSignedIn(token);
    } catch (e) {
      const text = e instanceof ApiError && e.status === 401
        ? `refused: the server answered 401 (${e.reason})`
        : `could not sign in: ${describe(e)}`;
      status.replaceChildren(note('error', text, { 'data-testid': 'signin-error' }));
      input.select();
    }
  });
  main.replaceChildren(form);
  input.focus();
}

// -- federations -----------------------------------------------------------------------------------------

function createForm(status) {
  const field = (label, input, hint) => h('label', { class: 'field' }, h('span', {}, label), input, hint ? h('small', {}, hint) : null);
  const name = h('input', { name: 'name', maxlength: 200, 'data-testid': 'spec-name' });
  const numClasses = h('input', { name: 'num_classes', type: 'number', min: 2, max: 1000, value: '10', required: true, 'data-testid': 'spec-num-classes' });
  const method = h('select', { name: 'method', 'data-testid': 'spec-method' }, METHODS.map((m) => h('option', { value: m }, m)));
  const quorum = h('input', { name: 'quorum', type: 'number', min: 1, value: '1', required: true, 'data-testid': 'spec-quorum' });
  const deadline = h('input', { name: 'round_deadline_s', type: 'number', min: 0, step: 'any', placeholder: 'server default', 'data-testid': 'spec-deadline' });
  const classNames = h('textarea', { name: 'class_names', rows: 4, placeholder: 'one per line (optional)', 'data-testid': 'spec-class-names' });
  const extra = h('textarea', { name: 'extra', rows: 3, placeholder: '{"aligner": {"steps": 100}}', 'data-testid': 'spec-extra' });
  const form = h('form', { class: 'grid', 'data-testid': 'create-federation' },
    field('Name', name), field('Classes (C)', numClasses), field('Method', method), field('Quorum', quorum),
    field('Round deadline (s)', deadline),
    field('Class names', classNames, 'one per line; as many as classes'),
    field('More settings (JSON)', extra, 'merged into the spec: aligner, fedktl, baseline, privacy, seed, …'),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Create federation')));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    let spec;
    try {
      spec = extra.value.trim() ? JSON.parse(extra.value) : {};
      if (typeof spec !== 'object' || spec === null || Array.isArray(spec)) throw new Error('not an object');
    } catch (e) {
      status.replaceChildren(note('error', `More settings: not a JSON object (${e.message})`, { 'data-testid': 'create-error' }));
      return;
    }
    spec.num_classes = Number(numClasses.value);
    spec.method = method.value;
    spec.quorum = Number(quorum.value);
    if (name.value.trim()) spec.name = name.value.trim();
    if (deadline.value !== '') spec.round_deadline_s = Number(deadline.value);
    const names = classNames.value.split('\n').map((s) => s.trim()).filter((s) => s.length > 0);
    if (names.length) spec.class_names = names;
    try {
      const fed = await postJSON('/v1/federations', spec);
      location.hash = `#/federations/${seg(fed.id)}`;
    } catch (e) {
      const details = (e.body && Array.isArray(e.body.details) ? e.body.details : []).map((d) =>
        h('li', {}, `${(d.loc || []).join('.')}: ${d.msg}`));
      status.replaceChildren(h('div', { class: 'note error', role: 'alert', 'data-testid': 'create-error' },
        h('p', {}, `refused — ${describe(e)}`), details.length ? h('ul', {}, details) : null));
    }
  });
  return form;
}

export async function federationsView(main) {
  const status = h('div', { 'data-testid': 'federations-status' });
  const tbody = h('tbody', {});
  const table = h('table', { class: 'list', 'data-testid': 'federations' },
    h('thead', {}, h('tr', {}, ['Name', 'Id', 'Method', 'State', 'Classes', 'Quorum', 'Round', 'Clients', ''].map((t) => h('th', {}, t)))),
    tbody);
  const createStatus = h('div', {});
  main.replaceChildren(
    h('h1', {}, 'Federations'),
    section('All federations', status, table),
    section('New federation', createForm(createStatus), createStatus),
  );
  const load = async () => {
    const feds = [];
    let after = null;
    for (;;) { // every page (100 at a time)
      const page = await getJSON(`/v1/federations?limit=100${after ? `&after=${seg(after)}` : ''}`);
      feds.push(...page);
      if (page.length < 100) break;
      after = page[page.length - 1].id;
    }
    tbody.replaceChildren(...feds.map((f) => federationRow(f, status, load)));
    if (!feds.length) tbody.append(h('tr', {}, h('td', { colspan: 9 }, 'No federation yet: create one below.')));
  };
  try {
    await load();
  } catch (e) {
    status.replaceChildren(note('error', describe(e)));
  }
}

/**
 * The operator's buttons for a federation, as its state allows: Pause while active, Resume while paused,
 * Delete unless a round is being computed (the server would refuse it: cancel that round first).
 */
function federationButtons(f, status, { onChange, onDeleted }) {
  const path = fedPath(f.id);
  const label = f.spec.name || f.id;
  const act = (verb, text) => actionButton(verb === 'pause' ? 'Pause' : 'Resume', async () => {
    const now = await postJSON(`${path}/${verb}`);
    status.replaceChildren(note('ok', `${label}: ${text}`));
    await onChange(now);
  }, status, { 'data-testid': `federation-${verb}` });
  const remove = f.aligning_round !== null && f.aligning_round !== undefined
    ? h('button', { type: 'button', disabled: true, 'data-testid': 'federation-delete',
      title: `round ${f.aligning_round} is being computed: cancel it or wait for it before deleting` }, 'Delete')
    : confirmButton('Delete', 'Really delete?', async () => {
      await deleteJSON(path);
      status.replaceChildren(note('ok', `${label}: deleted`));
      await onDeleted();
    }, status, { 'data-testid': 'federation-delete' });
  return [
    f.state === 'paused' ? act('resume', 'resumed') : act('pause', 'paused: uploads are refused, rounds wait'),
    remove,
  ];
}

function federationRow(f, status, reload) {
  return h('tr', { 'data-testid': 'federation-row', 'data-fid': f.id, 'data-state': f.state },
    h('td', {}, h('a', { href: `#/federations/${seg(f.id)}` }, f.spec.name || '(unnamed)')),
    h('td', { class: 'mono' }, f.id), h('td', {}, f.method), h('td', {}, badge(f.state ?? 'active')),
    h('td', {}, String(f.spec.num_classes)),
    h('td', {}, String(f.spec.quorum)), h('td', {}, String(f.current_round)), h('td', {}, String(f.clients)),
    h('td', { class: 'actions' }, federationButtons(f, status, { onChange: reload, onDeleted: reload })));
}

// -- one federation --------------------------------------------------------------------------------------

function settingsTable(fed) {
  const spec = fed.spec;
  const rows = [
    ['Id', h('span', { class: 'mono' }, fed.id)],
    ['Name', spec.name ?? '—'],
    ['Method', fed.method],
    ['Classes (C)', String(spec.num_classes)],
    ['Prototype dim (K)', String(fed.proto_dim)],
    ['Quorum', String(spec.quorum)],
    ['Round deadline', fmtSeconds(spec.round_deadline_s)],
    ['ETF seed / seed', `${fed.etf_seed} / ${spec.seed}`],
    ['Created', fmtTime(fed.created_at)],
    ['Broadcast file', fed.broadcast_file],
    ['Class names', spec.class_names ? h('ol', { start: 0, class: 'class-names', 'data-testid': 'class-names' },
      spec.class_names.map((n) => h('li', {}, n))) : '—'],
  ];
  for (const key of ['fedktl', 'aligner', 'baseline', 'privacy']) {
    if (spec[key]) {
      const text = Object.entries(spec[key]).map(([k, v]) => `${k} = ${JSON.stringify(v)}`).join(', ');
      rows.push([`${key} settings`, h('span', { class: 'mono small' }, text)]);
    }
  }
  if (fed.cost) rows.push(['Admitted cost', `${fmtBytes(fed.cost.memory_bytes)}, ${fmtSeconds(fed.cost.seconds)} per round`]);
  if (fed.privacy) {
    const p = fed.privacy;
    rows.push(['Privacy', `ε ${fmtNum(p.epsilon)}, δ ${fmtNum(p.delta)} over ${p.rounds} rounds; spent ε ${fmtNum(p.epsilon_spent)} after ${p.releases}`]);
  }
  return kvTable(rows, { 'data-testid': 'settings' });
}

function generatorTable(gen) {
  if (!gen) return note('info', 'This method has no generator.');
  return kvTable([
    ['Name', gen.name], ['Latent dim', String(gen.latent_dim)], ['Image size', `${gen.image_size} px`],
    ['Pretrained', gen.pretrained ? 'yes' : 'no'], ['About', gen.description],
  ], { 'data-testid': 'generator' });
}

function clientsSection(fid) {
  const status = h('div', {});
  const onceBox = h('div', { 'data-testid': 'client-token-box' });
  const tbody = h('tbody', {});
  const load = async () => {
    const clients = [];
    let after = null;
    for (;;) {
      const page = await getJSON(`${fedPath(fid)}/clients?limit=100${after ? `&after=${seg(after)}` : ''}`);
      clients.push(...page);
      if (page.length < 100) break;
      after = page[page.length - 1].client_id;
    }
    tbody.replaceChildren(...clients.map((c) => h('tr', { 'data-testid': 'client-row', 'data-client': c.client_id },
      h('td', { 'data-testid': 'client-name' }, c.name ?? '(unnamed)'), h('td', { class: 'mono' }, c.client_id),
      h('td', {}, c.active ? 'active' : 'removed'), h('td', {}, fmtTime(c.created_at)),
      h('td', {}, c.active ? confirmButton('Remove', 'Really remove?', async () => {
        await deleteJSON(`${fedPath(fid)}/clients/${seg(c.client_id)}`);
        status.replaceChildren(note('ok', `${c.name ?? c.client_id} removed: its token no longer works`));
        await load();
      }, status) : null))));
    if (!clients.length) tbody.append(h('tr', {}, h('td', { colspan: 5 }, 'No client yet.')));
  };
  const nameInput = h('input', { name: 'client-name', maxlength: 200, placeholder: 'site-a', 'data-testid': 'client-name-input' });
  const form = h('form', { class: 'inline', 'data-testid': 'register-client' },
    h('label', {}, 'Name ', nameInput), h('button', { type: 'submit' }, 'Register client'));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    try {
      const name = nameInput.value.trim();
      const created = await postJSON(`${fedPath(fid)}/clients`, name ? { name } : {});
      onceBox.replaceChildren(h('div', { class: 'note ok token-once' },
        h('p', {}, `Client ${name || created.client_id} registered. Its token, shown once (copy it now):`),
        h('code', { 'data-testid': 'client-token' }, created.token)));
      nameInput.value = '';
      await load();
    } catch (e) {
      status.replaceChildren(note('error', describe(e)));
    }
  });
  const node = section('Clients', form, onceBox, status,
    h('table', { class: 'list', 'data-testid': 'clients' },
      h('thead', {}, h('tr', {}, ['Name', 'Id', 'State', 'Registered', ''].map((t) => h('th', {}, t)))), tbody));
  return { node, load };
}

function duration(rnd) {
  const parts = [];
  if (rnd.closed_at) parts.push(`open ${fmtSeconds(rnd.closed_at - rnd.opened_at)}`);
  else parts.push(`open for ${fmtSeconds(Math.max(0, Date.now() / 1000 - rnd.opened_at))}`);
  if (rnd.published_at && rnd.closed_at) parts.push(`step ${fmtSeconds(rnd.published_at - rnd.closed_at)}`);
  return parts.join(' · ');
}

function roundRow(fid, rnd) {
  return h('tr', { 'data-testid': 'round-row', 'data-round': rnd.round, 'data-state': rnd.state },
    h('td', {}, h('a', { href: `#/federations/${seg(fid)}/rounds/${rnd.round}` }, `Round ${rnd.round}`)),
    h('td', {}, badge(rnd.state)),
    h('td', { 'data-testid': 'uploads' }, `${rnd.uploads} / ${rnd.quorum}`),
    h('td', {}, fmtBytes(rnd.bytes_received)), h('td', {}, duration(rnd)), h('td', {}, rnd.error ?? ''));
}

const CURVE_PAGE = 500; // rounds per request of the learning curve

/**
 * How the federation learns: what its clients reported with their uploads, round by round (GET …/metrics),
 * drawn as the mean per round with the spread across clients. Rounds that are over never change, so
 * only the rounds from the first one still open are asked for again.
 */
function learningCurve(fid) {
  const rounds = new Map(); // round → {state, metrics}
  let settled = 0; // rounds 1..settled are final
  const select = h('select', { 'data-testid': 'curve-metric', 'aria-label': 'metric' });
  const holder = h('div', { 'data-testid': 'accuracy-chart' });
  const table = h('div', {});
  let names = [];
  const draw = () => {
    const all = [...rounds.keys()].sort((a, b) => a - b);
    const seen = new Set();
    for (const r of all) for (const name of Object.keys(rounds.get(r).metrics)) seen.add(name);
    const next = [...seen].sort((a, b) => (a === 'accuracy' ? -1 : b === 'accuracy' ? 1 : a.localeCompare(b)));
    if (next.join() !== names.join()) {
      const keep = select.value;
      names = next;
      select.replaceChildren(...names.map((n) => h('option', { value: n }, n)));
      if (names.includes(keep)) select.value = keep;
    }
    const name = select.value || names[0];
    if (!name) {
      holder.replaceChildren(note('info', 'No client has reported metrics yet (clients send them with their uploads: the Ktl-Metrics header).', { 'data-testid': 'curve-empty' }));
      table.replaceChildren();
      return;
    }
    const points = all.filter((r) => rounds.get(r).metrics[name]).map((r) => ({ round: r, ...rounds.get(r).metrics[name] }));
    holder.dataset.metric = name;
    holder.dataset.rounds = String(points.length);
    holder.dataset.last = points.length ? String(points[points.length - 1].mean) : '';
    holder.replaceChildren(roundChart(points, {
      label: name,
      title: `${name} per round: the clients' sample-weighted mean (line) and their spread, min to max (band)`,
    }));
    const recent = points.slice(-5).reverse();
    table.replaceChildren(h('table', { class: 'list', 'data-testid': 'curve-table' },
      h('thead', {}, h('tr', {}, ['Round', 'Mean', 'Std', 'Min', 'Max', 'Clients', 'Samples'].map((t) => h('th', {}, t)))),
      h('tbody', {}, recent.map((p) => h('tr', { 'data-testid': 'curve-row', 'data-round': p.round },
        h('td', {}, String(p.round)), h('td', { 'data-testid': 'curve-mean' }, fmtNum(p.mean)), h('td', {}, fmtNum(p.std)),
        h('td', {}, fmtNum(p.min)), h('td', {}, fmtNum(p.max)), h('td', {}, String(p.clients)), h('td', {}, String(p.n_samples)))))));
  };
  select.addEventListener('change', draw);
  const update = async () => {
    let after = settled;
    for (;;) { // every page from the first round that may still change
      const page = await getJSON(`${fedPath(fid)}/metrics?after=${after}&limit=${CURVE_PAGE}`);
      for (const r of page.rounds) {
        rounds.set(r.round, r);
        if (FINAL_ROUND.has(r.state) && r.round === settled + 1) settled = r.round;
      }
      if (page.rounds.length < CURVE_PAGE) break;
      after = page.rounds[page.rounds.length - 1].round;
    }
    draw();
  };
  const node = section('How the federation learns', h('label', { class: 'inline-field' }, 'Metric ', select), holder, table);
  return { node, update };
}

export async function federationView(main, ctx, { fid }) {
  const status = h('div', {});
  let fed;
  try {
    fed = await getJSON(fedPath(fid));
  } catch (e) {
    main.replaceChildren(h('h1', {}, 'Federation'), note('error', describe(e)));
    return;
  }
  const title = h('h1', { 'data-testid': 'federation-title' }, fed.spec.name || fed.id);
  const actions = h('div', { class: 'actions', 'data-testid': 'federation-actions' });
  const subtitle = h('p', { class: 'sub' });
  let shown = null; // the state the buttons were drawn for
  const drawActions = (f) => {
    const key = `${f.state}/${f.aligning_round}`;
    subtitle.replaceChildren(`${f.method} · round ${f.current_round} · `, badge(f.state ?? 'active'));
    if (key === shown) return;
    shown = key;
    actions.dataset.state = f.state;
    actions.replaceChildren(...federationButtons(f, status, {
      onChange: async (now) => drawActions(now),
      onDeleted: async () => { location.hash = '#/federations'; },
    }), h('a', { class: 'button', href: `#/jobs?federation=${seg(fid)}` }, 'Generate images…'));
  };
  drawActions(fed);
  const curve = learningCurve(fid);
  const tbody = h('tbody', {});
  const live = h('span', { class: 'live', 'data-testid': 'live' }, '');
  const timeline = section('Rounds', live,
    h('table', { class: 'list', 'data-testid': 'rounds' },
      h('thead', {}, h('tr', {}, ['Round', 'State', 'Uploads / quorum', 'Bytes in', 'Duration', 'Error'].map((t) => h('th', {}, t)))),
      tbody));
  const clients = clientsSection(fid);
  main.replaceChildren(
    h('p', { class: 'crumbs' }, h('a', { href: '#/federations' }, 'Federations'), ' / ', fed.id),
    title, subtitle, actions, status, curve.node,
    h('div', { class: 'columns' }, section('Settings', settingsTable(fed)), section('Generator', generatorTable(fed.generator))),
    clients.node, timeline);
  clients.load().catch((e) => status.replaceChildren(note('error', describe(e))));

  const finished = new Map(); // round → its final JSON (never changes again)
  ctx.every(1000, async () => {
    const now = await getJSON(fedPath(fid));
    if (!ctx.alive()) return;
    drawActions(now);
    await curve.update();
    const low = Math.max(1, now.current_round - TIMELINE_ROUNDS + 1);
    const rows = [];
    for (let r = now.current_round; r >= low; r -= 1) {
      let rnd = finished.get(r);
      if (!rnd) {
        rnd = await getJSON(roundPath(fid, r));
        if (FINAL_ROUND.has(rnd.state)) finished.set(r, rnd);
      }
      rows.push(rnd);
    }
    if (!ctx.alive()) return;
    tbody.replaceChildren(...rows.map((rnd) => roundRow(fid, rnd)));
    live.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
  });
}

// -- one round -------------------------------------------------------------------------------------------

const STAT_LABELS = {
  uploads: 'uploads', rows: 'prototype rows', align_loss_first: 'align loss (first step)',
  align_loss_last: 'align loss (last step)', align_mmd_last: 'MMD² (last step)', align_mse_last: 'MSE (last step)',
  align_seconds: 'align seconds', synthesize_seconds: 'synthesize seconds', server_seconds: 'server seconds',
};

function statsSection(fid, rnd, ctx) {
  const stats = rnd.stats;
  if (!stats || !Object.keys(stats).length) return section('Alignment', note('info', 'No statistics yet (they come when the round is published).'));
  const rows = Object.entries(stats).filter(([, v]) => typeof v === 'number')
    .map(([k, v]) => [STAT_LABELS[k] ?? k, fmtNum(v)]);
  const others = Object.entries(stats).filter(([, v]) => typeof v !== 'number')
    .map(([k, v]) => [STAT_LABELS[k] ?? k, h('pre', {}, JSON.stringify(v, null, 1))]);
  // First and last steps at once; the per-step curve replaces them when the round serves its history.
  const bars = ['align_loss_first', 'align_loss_last', 'align_mmd_last', 'align_mse_last']
    .filter((k) => typeof stats[k] === 'number').map((k) => [STAT_LABELS[k], stats[k]]);
  const holder = h('div', { 'data-testid': 'align-chart' },
    bars.length ? barChart(bars, { title: 'The aligner: first and last step' }) : null);
  if (rnd.state === 'published') {
    getJSON(`${roundPath(fid, rnd.round)}/align-history`).then((history) => {
      if (!ctx.alive() || !history || !Array.isArray(history.loss)) return;
      holder.replaceChildren(lineChart({ loss: history.loss, mmd: history.mmd, mse: history.mse },
        { title: `The aligner per step (${history.loss.length} steps): loss, MMD², MSE (each on its own scale)` }));
      holder.dataset.steps = String(history.loss.length);
    }).catch(() => {}); // methods without an aligner have no history: the summary stays
  }
  return section('Alignment', h('div', { 'data-testid': 'stats' }, holder, kvTable([...rows, ...others], { 'data-testid': 'stats-table' })));
}

const QUALITY_ROWS = [
  ['mmd_to_prior', 'MMD² to the prior'], ['mmd_prior_to_prior', 'MMD² prior to prior'], ['mmd_ratio', 'MMD ratio'],
  ['prior_scale', 'prior scale'], ['centroid_min_distance', 'centroid distance (min)'],
  ['centroid_mean_distance', 'centroid distance (mean)'], ['kid', 'KID'], ['kid_std', 'KID std'],
];

function qualitySection(fid, rnd, fed, ctx) {
  if (!('quality' in rnd)) return section('Quality', note('info', 'This server does not report alignment quality.', { 'data-testid': 'quality-absent' }));
  const q = rnd.quality;
  if (!q) return section('Quality', note('info', 'No quality report for this round.', { 'data-testid': 'quality-absent' }));
  const names = fed.spec.class_names || [];
  const rows = QUALITY_ROWS.filter(([k]) => k in q).map(([k, label]) => [label, h('span', { 'data-testid': `quality-${k}` }, fmtNum(q[k]))]);
  // Per class: the clients' spread, and (reports with per-class typicality) the centroid's norm, its distance
  // outside the prior's norm band, its rows and holders; a class off the band is marked.
  const classes = q.classes && typeof q.classes === 'object' ? q.classes : {};
  const band = q.norm_band && typeof q.norm_band === 'object' ? q.norm_band : null;
  const cell = (v) => h('td', {}, typeof v === 'number' ? fmtNum(v) : '—');
  const spread = q.class_spread && typeof q.class_spread === 'object'
    ? h('table', { class: 'list', 'data-testid': 'quality-spread' },
      band ? h('caption', { 'data-testid': 'quality-band' },
        `prior's ${Math.round(100 * band.coverage)} % norm band: ${fmtNum(band.lo)}–${fmtNum(band.hi)}`) : null,
      h('thead', {}, h('tr', {}, ...['class', 'spread', 'norm', 'off band', 'rows', 'holders', ''].map((t) => h('th', {}, t)))),
      h('tbody', {}, Object.entries(q.class_spread).map(([c, v]) => {
        const f = classes[c] || {};
        const off = f.inside === false;
        return h('tr', { class: off ? 'off-manifold' : '', 'data-testid': `quality-class-${c}`, 'data-inside': String(!off) },
          h('td', {}, names[Number(c)] !== undefined ? `${c} · ${names[Number(c)]}` : c), h('td', {}, fmtNum(v)),
          cell(f.norm), cell(f.distance), cell(f.rows), cell(f.holders),
          h('td', {}, off ? h('span', { class: 'badge verdict-off-manifold' }, 'off-manifold') : (f.inside ? 'in band' : '')));
      })))
    : null;
  const thresholds = q.thresholds && typeof q.thresholds === 'object'
    ? kvTable(Object.entries(q.thresholds).map(([k, v]) => [k, typeof v === 'number' ? fmtNum(v) : JSON.stringify(v)]), { 'data-testid': 'quality-thresholds' })
    : null;
  const figure = h('figure', { class: 'quality-image' }, h('figcaption', {}, 'PCA of the aligned latents and the prior'));
  getBlob(`${roundPath(fid, rnd.round)}/quality.png`).then((blob) => {
    if (!ctx.alive()) return;
    figure.prepend(h('img', { src: ctx.objectURL(blob), alt: 'quality: PCA of the latents', 'data-testid': 'quality-image' }));
  }).catch((e) => figure.append(note('info', `No quality image: ${describe(e)}`)));
  return section('Quality',
    h('p', { class: `verdict verdict-${q.verdict}`, 'data-testid': 'quality-verdict', 'data-verdict': q.verdict },
      q.verdict_line || q.verdict || '?'),
    h('div', { class: 'columns' }, h('div', {}, kvTable(rows, { 'data-testid': 'quality-table' }), thresholds ? h('h3', {}, 'Thresholds') : null, thresholds),
      h('div', {}, spread)),
    figure);
}

function pairsSection(fid, rnd, fed, ctx) {
  if (fed.method !== 'fedktl') return section('Pairs', note('info', `The ${fed.method} method publishes no image grid (its broadcast: ${fed.broadcast_file}).`));
  const figure = h('figure', { class: 'pairs' }, h('figcaption', {}, 'The round\'s image-vector pairs (pairs.png)'));
  getBlob(`${roundPath(fid, rnd.round)}/pairs.png`).then((blob) => {
    if (!ctx.alive()) return;
    figure.prepend(h('img', { src: ctx.objectURL(blob), alt: `pairs of round ${rnd.round}`, 'data-testid': 'pairs-image' }));
  }).catch((e) => figure.append(note('error', describe(e))));
  return section('Pairs', figure);
}

export async function roundView(main, ctx, { fid, r }) {
  let fed;
  try {
    fed = await getJSON(fedPath(fid));
  } catch (e) {
    main.replaceChildren(h('h1', {}, `Round ${r}`), note('error', describe(e)));
    return;
  }
  const head = h('div', {});
  const body = h('div', {});
  const clientMetrics = h('div', {});
  main.replaceChildren(
    h('p', { class: 'crumbs' }, h('a', { href: '#/federations' }, 'Federations'), ' / ',
      h('a', { href: `#/federations/${seg(fid)}` }, fed.spec.name || fid), ' / ', `round ${r}`),
    h('h1', {}, `Round ${r}`), head, section("The clients' metrics (sent with their uploads)", clientMetrics), body);
  let lastState = null;
  ctx.every(1000, async () => {
    const rnd = await getJSON(roundPath(fid, r));
    if (!ctx.alive()) return;
    head.replaceChildren(kvTable([
      ['State', badge(rnd.state)], ['Uploads / quorum', `${rnd.uploads} / ${rnd.quorum}`],
      ['Bytes in', fmtBytes(rnd.bytes_received)], ['Opened', fmtTime(rnd.opened_at)],
      ['Deadline', fmtTime(rnd.deadline_at)], ['Closed', fmtTime(rnd.closed_at)],
      ['Published', fmtTime(rnd.published_at)], ['Duration', duration(rnd)],
      ['Uploaded by', rnd.clients.length ? h('span', { class: 'mono' }, rnd.clients.join(', ')) : '—'],
      ['Error', rnd.error ?? '—'],
    ], { 'data-testid': 'round' }));
    const reported = Object.entries(rnd.metrics || {});
    clientMetrics.replaceChildren(reported.length
      ? h('table', { class: 'list', 'data-testid': 'round-metrics' },
        h('thead', {}, h('tr', {}, ['Metric', 'Mean', 'Std', 'Min', 'Max', 'Clients', 'Samples'].map((t) => h('th', {}, t)))),
        h('tbody', {}, reported.map(([name, m]) => h('tr', { 'data-metric': name },
          h('td', {}, name), h('td', {}, fmtNum(m.mean)), h('td', {}, fmtNum(m.std)), h('td', {}, fmtNum(m.min)),
          h('td', {}, fmtNum(m.max)), h('td', {}, String(m.clients)), h('td', {}, String(m.n_samples))))))
      : note('info', 'No client sent metrics with its upload this round.'));
    if (rnd.state !== lastState) {
      lastState = rnd.state;
      const parts = [statsSection(fid, rnd, ctx)];
      if (rnd.state === 'published') {
        parts.unshift(pairsSection(fid, rnd, fed, ctx));
        parts.push(qualitySection(fid, rnd, fed, ctx));
        parts.push(h('p', {}, h('a', { class: 'button', href: `#/jobs?federation=${seg(fid)}&round=${r}` }, 'Generate images from this round…')));
      }
      body.replaceChildren(...parts);
    }
    return FINAL_ROUND.has(rnd.state) ? 'stop' : undefined;
  });
}

// -- jobs ------------------------------------------------------------------------------------------------

const JOBS_PAGE = 20; // jobs per page of the list (newest first)

function download(blob, filename, ctx) {
  const a = h('a', { href: ctx.objectURL(blob), download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
}

function jobCard(job, ctx, status) {
  const pct = Math.round(job.progress * 100);
  const eta = job.state === 'running' && job.eta_s !== null ? ` · ETA ${fmtSeconds(job.eta_s)}` : '';
  const spec = job.spec;
  const what = spec.federation_id ? `${spec.federation_id}, round ${spec.round ?? 'latest'}` : `${(spec.latents || []).length} latents`;
  return h('div', { class: 'card job', 'data-testid': 'job', 'data-job': job.id, 'data-state': job.state },
    h('p', {}, h('span', { class: 'mono' }, job.id), ' ', badge(job.state), ` ${what}, ${spec.per_class} per class, spread ${spec.spread}`),
    h('progress', { max: 100, value: String(pct), 'data-testid': 'job-progress' }, `${pct} %`),
    h('p', { 'data-testid': 'job-progress-text' }, `${job.done} / ${job.total} images · ${pct} %${eta}`),
    job.error ? note('error', job.error) : null,
    h('div', { class: 'actions' },
      FINAL_JOB.has(job.state) ? null : actionButton('Cancel', async () => { await deleteJSON(`/v1/jobs/${seg(job.id)}`); }, status),
      job.state === 'done' ? actionButton('Download', async () => {
        download(await getBlob(`/v1/jobs/${seg(job.id)}/result`), `${job.id}.safetensors`, ctx);
      }, status, { 'data-testid': 'job-download' }) : null));
}

export async function jobsView(main, ctx, params) {
  const status = h('div', { 'data-testid': 'jobs-status' });
  const list = h('div', { 'data-testid': 'jobs' });
  const fedSelect = h('select', { name: 'federation', 'data-testid': 'job-federation', required: true });
  const round = h('input', { name: 'round', type: 'number', min: 1, placeholder: 'latest', value: params.round ?? '', 'data-testid': 'job-round' });
  const perClass = h('input', { name: 'per_class', type: 'number', min: 1, value: '4', required: true, 'data-testid': 'job-per-class' });
  // 0.25: distinct images per class, latents still in the prior's typical set (DEFAULT_SPREAD in ktl/generator/base.py)
  const spread = h('input', { name: 'spread', type: 'number', min: 0, step: 'any', value: '0.25', 'data-testid': 'job-spread' });
  const seed = h('input', { name: 'seed', type: 'number', min: 0, value: '0', 'data-testid': 'job-seed' });
  const field = (label, input) => h('label', { class: 'field' }, h('span', {}, label), input);
  const form = h('form', { class: 'grid', 'data-testid': 'submit-job' },
    field('Federation', fedSelect), field('Round', round), field('Images per class', perClass),
    field('Spread', spread), field('Seed', seed), h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Submit job')));
  const older = h('button', { type: 'button', hidden: true, 'data-testid': 'jobs-older' }, 'Older jobs');
  main.replaceChildren(h('h1', {}, 'Jobs'), section('New generation job', form, status),
    section('All jobs (newest first)', list, h('div', { class: 'actions' }, older)));
  try {
    const feds = await getJSON('/v1/federations?limit=1000');
    fedSelect.replaceChildren(...feds.map((f) => h('option', { value: f.id }, `${f.spec.name || '(unnamed)'} — ${f.id}`)));
    if (params.federation) fedSelect.value = params.federation;
  } catch (e) {
    status.replaceChildren(note('error', describe(e)));
  }
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const spec = { federation_id: fedSelect.value, per_class: Number(perClass.value), spread: Number(spread.value || 0.25), seed: Number(seed.value || 0) };
    if (round.value !== '') spec.round = Number(round.value);
    try {
      const job = await postJSON('/v1/jobs', spec);
      status.replaceChildren(note('ok', `job ${job.id} queued`));
      refresh();
    } catch (e) {
      status.replaceChildren(note('error', `refused — ${describe(e)}`, { 'data-testid': 'job-error' }));
    }
  });
  // The newest `pages` pages are polled (one more page each time "Older jobs" is pressed).
  let pages = 1;
  const poll = async () => {
    const jobs = [];
    let after = null;
    let more = false;
    for (let i = 0; i < pages; i += 1) {
      const page = await getJSON(`/v1/jobs?limit=${JOBS_PAGE}${after ? `&after=${seg(after)}` : ''}`);
      jobs.push(...page);
      more = page.length === JOBS_PAGE;
      if (!more) break;
      after = page[page.length - 1].id;
    }
    if (!ctx.alive()) return;
    list.replaceChildren(...(jobs.length ? jobs.map((job) => jobCard(job, ctx, status)) : [note('info', 'No job yet.')]));
    older.hidden = !more;
  };
  older.addEventListener('click', () => {
    pages += 1;
    refresh();
  });
  const refresh = () => poll().catch((e) => status.replaceChildren(note('error', describe(e))));
  ctx.every(1000, poll);
}

// -- health ----------------------------------------------------------------------------------------------

/** Prometheus text → {name: [{labels, value}]} (samples only; comments skipped). */
export function parseMetrics(text) {
  const out = {};
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const pair of (m[3] || '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    (out[m[1]] ||= []).push({ labels, value: Number(m[4]) });
  }
  return out;
}

const COUNTERS = [
  ['ktl_uploads_total', 'uploads accepted', null], ['ktl_upload_rejects_total', 'uploads refused', 'reason'],
  ['ktl_rounds_total', 'rounds', 'outcome'], ['ktl_jobs_total', 'jobs', 'outcome'],
  ['ktl_images_generated_total', 'images generated', null], ['ktl_bytes_received_total', 'bytes received', 'bytes'],
  ['ktl_bytes_sent_total', 'bytes sent', 'bytes'], ['ktl_http_errors_total', 'HTTP errors', 'reason'],
];

export async function healthView(main, ctx) {
  const ready = h('div', {});
  const counters = h('div', {});
  main.replaceChildren(h('h1', {}, 'Health'), section('Readiness (/readyz)', ready), section('Counters (/metrics)', counters));
  ctx.every(2000, async () => {
    const [readyz, metrics] = await Promise.all([probe('/readyz'), probe('/metrics')]);
    if (!ctx.alive()) return;
    let body = null;
    try {
      body = JSON.parse(readyz.text);
    } catch {
      body = null;
    }
    ready.replaceChildren(body ? kvTable([
      ['Status', h('span', { class: `badge state-${body.status}`, 'data-testid': 'ready-status' }, `${body.status} (${readyz.status})`)],
      ['Device', h('span', { 'data-testid': 'device' }, body.device)],
      ['Devices (one worker each; rounds on the first)', h('span', { 'data-testid': 'devices' }, (body.devices || [body.device]).join(', '))],
      ['Generators', (body.generators || []).join(', ') || '—'],
      ['Disk free', h('span', { 'data-testid': 'disk-free' }, fmtBytes(body.disk_free_bytes))],
      ['Least free space', fmtBytes(body.min_free_bytes)],
    ], { 'data-testid': 'readyz' }) : note('error', `the server did not answer /readyz (${readyz.status})`));
    const samples = parseMetrics(metrics.text);
    const rows = COUNTERS.map(([name, label, by]) => {
      const list = samples[name] || [];
      const total = list.reduce((s, x) => s + x.value, 0);
      const value = by === 'bytes' ? fmtBytes(total) : String(total);
      const split = by && by !== 'bytes' && list.length
        ? ` (${list.map((x) => `${x.labels[by] ?? '?'}: ${x.value}`).join(', ')})` : '';
      return h('tr', { 'data-testid': 'counter', 'data-metric': name }, h('th', { scope: 'row' }, label), h('td', { class: 'mono' }, name), h('td', { 'data-testid': 'counter-value' }, value + split));
    });
    counters.replaceChildren(h('table', { class: 'list', 'data-testid': 'metrics' }, h('tbody', {}, rows)));
  });
}
