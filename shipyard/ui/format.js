// Times, durations and numbers as a person reads them. API times are ISO-8601 UTC; they are
// shown in the browser's local time zone.

const clockFormat = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
});
const dayFormat = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });
const fullFormat = new Intl.DateTimeFormat(undefined, {
  year: "numeric", month: "short", day: "numeric",
  hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
});
const numberFormat = new Intl.NumberFormat();

export function parseTime(iso) {
  if (!iso) return null;
  const t = Date.parse(iso);
  return Number.isNaN(t) ? null : t;
}

/** "42s", "3m 05s", "2h 04m". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours}h ${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(hours / 24)}d ${hours % 24}h`;
}

/** A ticking elapsed time: "04:12" or "1:04:12". */
export function elapsed(fromIso, now = Date.now()) {
  const start = parseTime(fromIso);
  if (start === null) return "—";
  const s = Math.max(0, Math.floor((now - start) / 1000));
  const hh = Math.floor(s / 3600);
  const mm = String(Math.floor((s % 3600) / 60)).padStart(2, "0");
  const ss = String(s % 60).padStart(2, "0");
  return hh ? `${hh}:${mm}:${ss}` : `${mm}:${ss}`;
}

export function secondsBetween(fromIso, toIso) {
  const a = parseTime(fromIso);
  const b = parseTime(toIso);
  return a === null || b === null ? null : (b - a) / 1000;
}

/** "14:02:33" today, "Mar 3, 14:02" before. */
export function when(iso) {
  const t = parseTime(iso);
  if (t === null) return "—";
  const date = new Date(t);
  if (new Date().toDateString() === date.toDateString()) return clockFormat.format(date);
  return `${dayFormat.format(date)}, ${clockFormat.format(date).slice(0, 5)}`;
}

export function clock(iso) {
  const t = parseTime(iso);
  return t === null ? "—" : clockFormat.format(new Date(t));
}

export function full(iso) {
  const t = parseTime(iso);
  return t === null ? "" : fullFormat.format(new Date(t));
}

/** "just now", "4 min ago", "3 h ago", then a date. */
export function ago(iso, now = Date.now()) {
  const t = parseTime(iso);
  if (t === null) return "—";
  const s = Math.round((now - t) / 1000);
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.max(1, Math.round(s / 60))} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return when(iso);
}

export function cost(usd) {
  const value = Number(usd) || 0;
  return value > 0 && value < 0.01 ? "<$0.01" : `$${value.toFixed(2)}`;
}

export function count(n) {
  return numberFormat.format(Number(n) || 0);
}

export function plural(n, one, many = `${one}s`) {
  return `${count(n)} ${n === 1 ? one : many}`;
}

/** "in_progress" → "In progress". */
export function words(slug) {
  const text = String(slug || "").replace(/_/g, " ");
  return text.charAt(0).toUpperCase() + text.slice(1);
}
