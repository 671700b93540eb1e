//! The Andon board people look at: `GET /`.

/// The page; it reads `/andon` and `/status` every two seconds.
pub(crate) const ANDON_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Andon</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #111; color: #eee; }
  header { padding: 1.5rem 2rem; font-size: 2.5rem; font-weight: 700; transition: background .3s; }
  .GREEN { background: #1b7f3b; } .YELLOW { background: #c9a300; color: #111; } .RED { background: #b3261e; }
  main { padding: 1rem 2rem; display: grid; grid-template-columns: repeat(auto-fit, minmax(16rem, 1fr)); gap: 1rem; }
  section { background: #1e1e1e; border-radius: .5rem; padding: 1rem; }
  h2 { margin: 0 0 .5rem; font-size: 1rem; color: #aaa; text-transform: uppercase; letter-spacing: .05em; }
  .figure { font-size: 1.6rem; font-weight: 600; }
  ul { margin: 0; padding-left: 1.2rem; } li { margin: .2rem 0; }
  small { color: #999; }
</style>
</head>
<body>
<header id="level" class="GREEN">…</header>
<main>
  <section><h2>Reasons</h2><ul id="reasons"><li>loading…</li></ul></section>
  <section><h2>Traffic (last 60 s)</h2>
    <div class="figure" id="rate">–</div><small>requests/s</small>
    <div class="figure" id="errors">–</div><small>5xx share</small>
    <div class="figure" id="p99">–</div><small>p99 latency</small></section>
  <section><h2>Circuit breakers</h2><ul id="breakers"></ul></section>
  <section><h2>Queues</h2><ul id="queues"></ul></section>
  <section><h2>Figures Andon judges</h2><ul id="figures"></ul></section>
  <section><h2>History</h2><ul id="history"></ul></section>
  <section><h2>Service</h2><div id="service"></div></section>
</main>
<script>
const text = (el, s) => { document.getElementById(el).textContent = s; };
const list = (el, items) => {
  const ul = document.getElementById(el); ul.replaceChildren();
  for (const s of items) { const li = document.createElement('li'); li.textContent = s; ul.appendChild(li); }
};
async function refresh() {
  try {
    const [andon, status] = await Promise.all([fetch('/andon').then(r => r.json()), fetch('/status').then(r => r.json())]);
    const header = document.getElementById('level');
    header.className = andon.level;
    header.textContent = `${status.service}: ${andon.level}`;
    list('reasons', andon.reasons.length ? andon.reasons.map(r => r.message) : ['all figures within their limits']);
    list('history', andon.history.slice(-8).reverse().map(t => `${t.at}: ${t.from} → ${t.to}`));
    const k = status.kaizen;
    text('rate', k.rate_per_sec.toFixed(1));
    text('errors', (k.error_rate * 100).toFixed(2) + ' %');
    text('p99', k.p99_ms.toFixed(1) + ' ms');
    list('breakers', status.breakers.length ? status.breakers.map(b => `${b.name}: ${b.state}`) : ['none']);
    list('queues', status.queues.length ? status.queues.map(q => `${q.name} (${q.backend}): ${q.depth.ready} ready, ${q.depth.in_flight} in flight`) : ['none']);
    list('figures', Object.entries(status.figures).map(([k, v]) => `${k}: ${Number.isInteger(v) ? v : v.toFixed(4)}`));
    text('service', `${status.service} ${status.version} · ${status.profile} · up ${Math.round(status.uptime_secs)} s`);
  } catch (e) {
    const header = document.getElementById('level');
    header.className = 'RED'; header.textContent = 'service not answering';
  }
}
refresh(); setInterval(refresh, 2000);
</script>
</body>
</html>
"#;
