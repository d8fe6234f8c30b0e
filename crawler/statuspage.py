"""The status page a person opens in a browser, its JSON API and fleet-level metrics.

``mmc4-crawl serve`` runs this app: ``/`` (HTML that polls ``/api/status`` every two seconds:
progress of the whole crawl (an estimate while shards are unread), images done, rate and queue
depth over time on a time axis, ETA, bytes stored, shards reported of all, a "finished" state,
status mix, failing hosts (permanent 404/410 apart from transient), shards, workers),
``/api/status`` (JSON), ``/metrics`` (fleet gauges for Prometheus) and ``/healthz``.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from core.errors import describe, redact
from core.keys import Keys
from crawler import monitor

CLIENT_KEY = web.AppKey("client", aioredis.Redis)
KEYS_KEY = web.AppKey("keys", Keys)


async def status_json(client: aioredis.Redis, keys: Keys) -> dict[str, Any]:
    snap = await monitor.snapshot(client, keys, history=360)
    out = snap.to_json()
    top: Any = await client.zrevrange(keys.hosts_failed, 0, 19, withscores=True)
    out["top_failing_hosts"] = [
        {"host": h.decode() if isinstance(h, bytes) else str(h), "failed": int(n)} for h, n in top
    ]
    out["eta"] = monitor.format_duration(snap.eta_s)
    return out


async def api_status(request: web.Request) -> web.Response:
    data = await status_json(request.app[CLIENT_KEY], request.app[KEYS_KEY])
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def fleet_metrics(request: web.Request) -> web.Response:
    snap = await monitor.snapshot(request.app[CLIENT_KEY], request.app[KEYS_KEY], history=2)
    lines = [
        "# HELP mmc4_fleet_queue_depth Items waiting in the queue",
        "# TYPE mmc4_fleet_queue_depth gauge",
        f"mmc4_fleet_queue_depth {snap.queued}",
        "# HELP mmc4_fleet_leased Items leased by workers",
        "# TYPE mmc4_fleet_leased gauge",
        f"mmc4_fleet_leased {snap.leased}",
        "# HELP mmc4_fleet_deferred Items deferred for busy hosts",
        "# TYPE mmc4_fleet_deferred gauge",
        f"mmc4_fleet_deferred {snap.deferred}",
        "# HELP mmc4_fleet_dead_letters Dead letters",
        "# TYPE mmc4_fleet_dead_letters gauge",
        f"mmc4_fleet_dead_letters {snap.dead_letters}",
        "# HELP mmc4_fleet_workers Live worker heartbeats",
        "# TYPE mmc4_fleet_workers gauge",
        f"mmc4_fleet_workers {len(snap.workers)}",
        "# HELP mmc4_fleet_images Images with a terminal status, by status",
        "# TYPE mmc4_fleet_images gauge",
    ]
    lines += [f'mmc4_fleet_images{{status="{k}"}} {v}' for k, v in snap.by_status.items()]
    gauges = [
        ("mmc4_fleet_stored_bytes", "Bytes of stored images", snap.bytes),
        ("mmc4_fleet_shards", "Shards given to ingest (the whole crawl)", snap.shards_total),
        ("mmc4_fleet_shards_reported", "Shards whose report is written", snap.shards_done),
        ("mmc4_fleet_finished", "1 when every shard given is reported", int(snap.finished)),
    ]
    if snap.total is not None:
        gauges.append((
            "mmc4_fleet_images_expected",
            "Images of the whole crawl (an estimate while shards are unread)", snap.total,
        ))  # fmt: skip
    for name, text, value in gauges:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {value}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def index(_: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def healthz(request: web.Request) -> web.Response:
    await request.app[CLIENT_KEY].ping()
    return web.Response(text="ok\n")


@web.middleware
async def redis_unavailable(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Redis down or refusing us: 503 with a one-line JSON error, never a 500 traceback."""
    try:
        return await handler(request)
    except (RedisError, OSError) as exc:
        message = describe(exc)
        text = message[1] if message is not None else f"Redis unavailable: {redact(str(exc))}"
        return web.json_response({"error": text}, status=503)


def make_app(client: aioredis.Redis, keys: Keys) -> web.Application:
    app = web.Application(middlewares=[redis_unavailable])
    app[CLIENT_KEY] = client
    app[KEYS_KEY] = keys
    app.router.add_get("/", index)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/metrics", fleet_metrics)
    app.router.add_get("/healthz", healthz)
    return app


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>mmc4-crawler status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 .6em; } h2 { font-size: 15px; margin: 1.2em 0 .4em; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em;
        min-width: 8em; }
.card .v { font-size: 22px; font-weight: 600; } .card .k { color: #666; font-size: 12px; }
table { border-collapse: collapse; background: #fff; } td, th { padding: .25em .7em;
        border-bottom: 1px solid #eee; text-align: left; } td.n { text-align: right; }
.bar { background: #e8eef7; width: 14em; height: .9em; border-radius: 3px; overflow: hidden; }
.bar > div { background: #3b78d8; height: 100%; }
svg { background: #fff; border: 1px solid #ddd; border-radius: 6px; }
#updated { color: #888; font-size: 12px; } .cols { display: flex; flex-wrap: wrap; gap: 2em; }
.state { font-size: 13px; padding: .1em .5em; border-radius: 4px; background: #e8eef7; }
.state.finished { background: #2e7d32; color: #fff; } td.none { color: #888; }
</style></head>
<body>
<h1>mmc4-crawler <span id="state" class="state">…</span>
<span id="updated">connecting…</span></h1>
<div class="cards">
  <div class="card"><div class="v" id="progress">–</div>
    <div class="k" id="progress-k">of the crawl</div></div>
  <div class="card"><div class="v" id="done">–</div><div class="k">images done</div></div>
  <div class="card"><div class="v" id="total">–</div>
    <div class="k" id="total-k">images in all</div></div>
  <div class="card"><div class="v" id="rate">–</div><div class="k">images/s</div></div>
  <div class="card"><div class="v" id="eta">–</div><div class="k" id="eta-k">ETA</div></div>
  <div class="card"><div class="v" id="shards-count">–</div>
    <div class="k">shards reported</div></div>
  <div class="card"><div class="v" id="bytes">–</div><div class="k">stored</div></div>
  <div class="card"><div class="v" id="queued">–</div><div class="k">queued</div></div>
  <div class="card"><div class="v" id="leased">–</div><div class="k">leased</div></div>
  <div class="card"><div class="v" id="dead">–</div><div class="k">dead letters</div></div>
  <div class="card"><div class="v" id="workers">–</div><div class="k">workers</div></div>
</div>
<div class="cols">
<div><h2>Images done over time</h2><svg id="done-chart" width="460" height="170"></svg></div>
<div><h2>Rate over time (images/s)</h2><svg id="rate-chart" width="460" height="170"></svg></div>
<div><h2>Queue depth over time</h2><svg id="chart" width="460" height="170"></svg></div>
</div>
<div class="cols">
<div><h2>Status mix</h2><table id="statuses"></table></div>
<div><h2>Failing hosts: permanent (404, 410)</h2><table id="hosts-permanent"></table></div>
<div><h2>Failing hosts: transient</h2><table id="hosts-transient"></table></div>
</div>
<h2>Shards in flight</h2><table id="shards"></table>
<h2>Workers</h2><table id="workerlist"></table>
<script>
const fmt = n => Number(n).toLocaleString("en-US");
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",
  '"':"&quot;"}[c]));
const set = (id, text) => { document.getElementById(id).textContent = text; };
function rows(id, head, body) {
  document.getElementById(id).innerHTML = "<tr>" + head.map(h => "<th>" + h + "</th>").join("")
    + "</tr>" + (body.length ? body.join("") : '<tr><td colspan="' + head.length
    + '" class="none">none</td></tr>');
}
function bar(frac) {
  return '<div class="bar"><div style="width:' + Math.round(100 * Math.min(1, frac))
    + '%"></div></div>';
}
function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB", "PB"];
  let i = 0; while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
const hhmmss = t => new Date(t * 1000).toTimeString().slice(0, 8);
// A line over time: x is wall-clock time (labelled), y from 0 to the series' maximum.
function lineChart(id, points) {
  const svg = document.getElementById(id), W = 460, H = 170, L = 50, R = 10, T = 12, B = 30;
  if (points.length < 2) {
    svg.innerHTML = '<text x="10" y="80">collecting samples…</text>'; return; }
  const t0 = points[0][0], t1 = points[points.length - 1][0], span = Math.max(1, t1 - t0);
  const vmax = Math.max(1e-9, ...points.map(p => p[1]));
  const x = t => L + (t - t0) / span * (W - L - R), y = v => H - B - v / vmax * (H - B - T);
  let out = '<line class="axis" x1="' + L + '" y1="' + (H - B) + '" x2="' + (W - R) + '" y2="'
    + (H - B) + '" stroke="#999"/><line class="axis" x1="' + L + '" y1="' + T + '" x2="' + L
    + '" y2="' + (H - B) + '" stroke="#999"/>';
  for (let i = 0; i <= 3; i++) {
    const t = t0 + span * i / 3;
    out += '<text class="time-axis" font-size="10" text-anchor="middle" x="' + x(t).toFixed(1)
      + '" y="' + (H - B + 14) + '">' + hhmmss(t) + "</text>";
  }
  out += '<text class="value-axis" font-size="10" text-anchor="end" x="' + (L - 4) + '" y="'
    + (T + 8) + '">' + fmt(Math.round(vmax * 10) / 10) + '</text><text font-size="10" '
    + 'text-anchor="end" x="' + (L - 4) + '" y="' + (H - B) + '">0</text>';
  const pts = points.map(p => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ");
  svg.innerHTML = out + '<polyline fill="none" stroke="#3b78d8" stroke-width="2" points="'
    + pts + '"/>';
}
function rates(history) {
  const out = [];
  for (let i = 1; i < history.length; i++) {
    const dt = history[i][0] - history[i - 1][0];
    if (dt > 0) out.push([history[i][0], Math.max(0, (history[i][1] - history[i - 1][1]) / dt)]);
  }
  return out;
}
async function refresh() {
  try {
    const resp = await fetch("/api/status");
    const s = await resp.json();
    if (!resp.ok) throw new Error(s.error || resp.status);
    const state = document.getElementById("state");
    state.textContent = s.finished ? "finished" : "crawling";
    state.className = "state " + (s.finished ? "finished" : "crawling");
    const est = s.total_is_estimate ? "~" : "";
    set("progress", s.total ? est + (100 * s.done / s.total).toFixed(1) + "%" : "?");
    set("progress-k", s.total_is_estimate ? "of the crawl (estimate)" : "of the crawl");
    set("done", fmt(s.done));
    set("total", s.total === null ? "?" : est + fmt(s.total));
    set("total-k", s.total_is_estimate ? "images in all (estimate: unread shards at the "
      + "average so far)" : "images in all");
    set("rate", s.rate.toFixed(1));
    set("eta", s.finished ? "done" : (s.eta_s === null ? "unknown" : est + s.eta));
    set("eta-k", s.total_is_estimate ? "ETA (estimate)" : "ETA");
    set("shards-count", fmt(s.shards_done) + " / " + fmt(s.shards_total));
    set("bytes", bytes(s.bytes));
    set("queued", fmt(s.queued));
    set("leased", fmt(s.leased));
    set("dead", fmt(s.dead_letters));
    set("workers", fmt(s.workers.length));
    lineChart("done-chart", s.history.map(h => [h[0], h[1]]));
    lineChart("rate-chart", rates(s.history));
    lineChart("chart", s.history.map(h => [h[0], h[2]]));
    const total = Math.max(1, s.done);
    rows("statuses", ["status", "images", ""], Object.entries(s.by_status).map(([k, v]) =>
      "<tr><td>" + esc(k) + '</td><td class="n">' + fmt(v) + "</td><td>" + bar(v / total)
      + "</td></tr>"));
    const hostRows = list => list.map(h =>
      "<tr><td>" + esc(h.host) + '</td><td class="n">' + fmt(h.failed) + "</td></tr>");
    rows("hosts-permanent", ["host", "images"], hostRows(s.failing_hosts_permanent));
    rows("hosts-transient", ["host", "images"], hostRows(s.failing_hosts_transient));
    rows("shards", ["shard", "done", "total", ""], s.shards_open.map(sh =>
      "<tr><td>" + esc(sh.shard) + '</td><td class="n">' + fmt(sh.done) + '</td><td class="n">'
      + (sh.total === null ? "enqueueing" : fmt(sh.total)) + "</td><td>"
      + bar(sh.done / Math.max(1, sh.total === null ? sh.images : sh.total)) + "</td></tr>"));
    rows("workerlist", ["worker", "processed", "held", "images/s"], s.workers.map(w =>
      "<tr><td>" + esc(w.id) + '</td><td class="n">' + fmt(w.processed || 0)
      + '</td><td class="n">' + fmt(w.held || 0) + '</td><td class="n">' + esc(w.rate || 0)
      + "</td></tr>"));
    set("updated", "updated " + new Date().toLocaleTimeString());
  } catch (e) {
    set("updated", "status unavailable: " + e.message);
  }
}
refresh(); setInterval(refresh, 2000);
</script>
</body></html>
"""
