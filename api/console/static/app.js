// The console's entry: sign-in, hash routes, and the life of each page (its polls and blob URLs).

import { ApiError, onUnauthorized, session } from './api.js';
import { h, note } from './dom.js';
import { federationView, federationsView, healthView, jobsView, roundView, signInView } from './views.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');

const ROUTES = [
  [/^#\/federations\/([^/?]+)\/rounds\/(\d+)$/, (m) => [roundView, { fid: decodeURIComponent(m[1]), r: Number(m[2]) }, 'federations']],
  [/^#\/federations\/([^/?]+)$/, (m) => [federationView, { fid: decodeURIComponent(m[1]) }, 'federations']],
  [/^#\/jobs(?:\?(.*))?$/, (m) => [jobsView, Object.fromEntries(new URLSearchParams(m[1] || '')), 'jobs']],
  [/^#\/health$/, () => [healthView, {}, 'health']],
  [/^#\/federations$/, () => [federationsView, {}, 'federations']],
];

let page = null; // the page shown: its timers and blob URLs, released when it goes

/** What a view may use while it is shown. */
function pageContext() {
  const ctx = {
    timers: new Set(),
    urls: [],
    live: true,
    alive: () => ctx.live && page === ctx,
    objectURL(blob) {
      const url = URL.createObjectURL(blob);
      ctx.urls.push(url);
      return url;
    },
    /** Run fn now and every ms after it finishes, until the page goes or fn returns 'stop'. */
    every(ms, fn) {
      const banner = h('div', { class: 'poll-error' });
      main.append(banner);
      const tick = async () => {
        let result;
        try {
          result = await fn();
          banner.replaceChildren();
        } catch (e) {
          if (!ctx.alive()) return;
          banner.replaceChildren(note('error', e instanceof ApiError ? e.describe() : String(e)));
        }
        if (ctx.alive() && result !== 'stop') {
          const timer = setTimeout(() => {
            ctx.timers.delete(timer);
            tick();
          }, ms);
          ctx.timers.add(timer);
        }
      };
      tick();
    },
    dispose() {
      ctx.live = false;
      for (const t of ctx.timers) clearTimeout(t);
      for (const u of ctx.urls) URL.revokeObjectURL(u);
    },
  };
  return ctx;
}

function show(message) {
  if (page) page.dispose();
  page = pageContext();
  if (!session.token()) {
    nav.hidden = true;
    signInView(main, {
      message,
      onSignedIn(token) {
        session.signIn(token);
        if (!location.hash || location.hash === '#/') location.hash = '#/federations';
        else show();
      },
    });
    return;
  }
  nav.hidden = false;
  const hash = location.hash && location.hash !== '#/' ? location.hash : '#/federations';
  let view = null;
  for (const [pattern, make] of ROUTES) {
    const m = pattern.exec(hash);
    if (m) {
      view = make(m);
      break;
    }
  }
  if (!view) {
    main.replaceChildren(h('h1', {}, 'Not found'), note('error', 'No such page.'), h('a', { href: '#/federations' }, 'Federations'));
    return;
  }
  const [render, params, section] = view;
  for (const a of nav.querySelectorAll('a[data-nav]')) a.classList.toggle('current', a.dataset.nav === section);
  main.replaceChildren();
  const ctx = page;
  render(main, ctx, params).catch((e) => {
    if (ctx.alive()) main.append(note('error', e instanceof ApiError ? e.describe() : String(e)));
  });
}

onUnauthorized((refusal) => {
  session.signOut();
  show(`signed out: the server refused the token (${refusal.reason})`);
});

document.getElementById('sign-out').addEventListener('click', () => {
  session.signOut();
  show();
});

window.addEventListener('hashchange', () => show());
show();
