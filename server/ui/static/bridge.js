// Gradio 5 only: runs panel.js (written for Gradio 6's gr.HTML `js_on_load`) with the same
// four names -- element, trigger, props, server -- served by hidden textboxes: writing one
// fires its `change` event in Python through the page's own Gradio session.
// Wrapped by Python as (function (CFG, PANEL) { ...this... })(config, panel source).
function box(name) {
  return document.querySelector('#batchrtc-' + name + ' textarea');
}
function write(name, value) {
  const ta = box(name);
  if (!ta) throw new Error('the page has no #batchrtc-' + name);
  ta.value = value;
  ta.dispatchEvent(new Event('input', {bubbles: true}));
}
// Server functions, one at a time (each waits for its own answer in the result box).
let seq = 0;
let chain = Promise.resolve();
function call(fn, data) {
  const id = ++seq;
  const run = () => new Promise((resolve, reject) => {
    write('call', JSON.stringify({id: id, fn: fn, data: data === undefined ? null : data}));
    const t0 = Date.now();
    const poll = () => {
      const ta = box('result');
      let r = null;
      try { r = ta && ta.value ? JSON.parse(ta.value) : null; } catch (e) { r = null; }
      if (r && r.id === id) {
        if (r.error) reject(new Error(r.error)); else resolve(r.result);
      } else if (Date.now() - t0 > 30000) {
        reject(new Error('no answer to ' + fn));
      } else {
        setTimeout(poll, 25);
      }
    };
    poll();
  });
  const p = chain.then(run, run);
  chain = p.catch(() => {});
  return p;
}
const server = new Proxy({}, {get: (_, fn) => (typeof fn === 'string' ? (data) => call(fn, data) : undefined)});
let n = 0;
const trigger = (name, data) => write(name, JSON.stringify({n: ++n, data: data}));
const AsyncFunction = Object.getPrototypeOf(async function () {}).constructor;
function start() {
  const element = document.querySelector('#batchrtc-panel');
  if (!element || !element.querySelector('.brtc-toggle') || !box('call') || !box('play')) {
    setTimeout(start, 100);
    return;
  }
  new AsyncFunction('element', 'trigger', 'props', 'server', PANEL)(element, trigger, {rtc: CFG}, server);
}
start();
