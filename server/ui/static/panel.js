const cfg = props.rtc || {};
const q = (s) => element.querySelector(s);
const root = q('.brtc'), btn = q('.brtc-toggle'), statusEl = q('.brtc-status'), logEl = q('.brtc-log');
const localVideo = q('.brtc-local-video'), remoteVideo = q('.brtc-remote-video'), remoteAudio = q('.brtc-remote-audio');
const micFill = q('.brtc-meter-mic .brtc-fill'), replyFill = q('.brtc-meter-reply .brtc-fill');
const state = {status: 'Idle', webrtcId: null, logs: [], errors: [], messages: [], connectionState: 'new',
  micLevel: 0, replyLevel: 0, maxMicLevel: 0, maxReplyLevel: 0};
element.batchrtc = state;
window.batchrtcUI = state;
const LOG_TEXT = {started_talking: 'Started talking', pause_detected: 'Pause detected', response_starting: 'Responding'};
let pc = null, dc = null, localStream = null, audioCtx = null, timer = null, meters = {};

function setStatus(text, kind) {
  state.status = text; statusEl.textContent = text;
  if (kind) root.dataset.state = kind;
}
function addLog(text, cls) {
  state.logs.push(text);
  const li = document.createElement('li');
  li.textContent = new Date().toLocaleTimeString() + '  ' + text;
  if (cls) li.className = cls;
  logEl.prepend(li);
  while (logEl.children.length > 6) logEl.lastChild.remove();
}
function constraints() {
  const tc = cfg.track_constraints;
  const split = tc && typeof tc === 'object' && ('video' in tc || 'audio' in tc);
  const pick = (kind) => {
    if (split) return tc[kind] === undefined ? defaults(kind) : tc[kind];
    if (tc && typeof tc === 'object' && kind === (cfg.video ? 'video' : 'audio')) return tc;
    return defaults(kind);
  };
  const defaults = (kind) => kind === 'audio' ? {echoCancellation: true, noiseSuppression: true, autoGainControl: true} : true;
  return {video: cfg.video ? pick('video') : false, audio: cfg.audio ? pick('audio') : false};
}
function meter(stream) {
  if (!audioCtx) return null;
  const src = audioCtx.createMediaStreamSource(stream);
  const an = audioCtx.createAnalyser();
  an.fftSize = 1024;
  src.connect(an);
  return {src, an, buf: new Float32Array(an.fftSize)};
}
function level(m) {
  if (!m) return 0;
  m.an.getFloatTimeDomainData(m.buf);
  let s = 0;
  for (let i = 0; i < m.buf.length; i++) s += m.buf[i] * m.buf[i];
  return Math.sqrt(s / m.buf.length);
}
function tick() {
  state.micLevel = level(meters.mic); state.replyLevel = level(meters.reply);
  state.maxMicLevel = Math.max(state.maxMicLevel, state.micLevel);
  state.maxReplyLevel = Math.max(state.maxReplyLevel, state.replyLevel);
  if (micFill) micFill.style.width = Math.min(100, state.micLevel * 400) + '%';
  if (replyFill) replyFill.style.width = Math.min(100, state.replyLevel * 400) + '%';
}
function refusal(body, status) {
  const meta = (body && body.meta) || {};
  if (meta.error === 'concurrency_limit_reached') return 'Server busy: at most ' + meta.limit + ' connection(s)';
  if (meta.error) return meta.error + (meta.detail ? ': ' + meta.detail : '');
  return 'offer refused (HTTP ' + status + ')';
}
function gathered(conn, ms) {
  if (conn.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { conn.removeEventListener('icegatheringstatechange', check); resolve(); };
    const check = () => { if (conn.iceGatheringState === 'complete') done(); };
    conn.addEventListener('icegatheringstatechange', check);
    setTimeout(done, ms);
  });
}
function onMessage(raw) {
  let m;
  try { m = JSON.parse(raw); } catch (e) { return; }
  state.messages.push(m);
  if (state.messages.length > 200) state.messages.shift();
  if (m.type === 'log') {
    const text = LOG_TEXT[m.data];
    if (text) { setStatus(text); addLog(text); }
  } else if (m.type === 'error') {
    state.errors.push(m.message); addLog('Error: ' + m.message, 'brtc-error');
  } else if (m.type === 'warning') {
    addLog('Warning: ' + m.message, 'brtc-warning');
  } else if (m.type === 'send_input') {
    if (state.webrtcId) trigger('submit', {webrtc_id: state.webrtcId});
  } else if (m.type === 'end_stream') {
    stop(m.data ? String(m.data) : 'Stream ended');
  }
}
function onTrack(track) {
  const s = new MediaStream([track]);
  if (track.kind === 'video' && remoteVideo) {
    remoteVideo.srcObject = s; remoteVideo.play().catch(() => {});
  } else if (track.kind === 'audio' && remoteAudio) {
    remoteAudio.srcObject = s; remoteAudio.play().catch(() => {});
    meters.reply = meter(s);
  }
}
async function start() {
  if (pc) return;
  btn.disabled = true;
  setStatus('Connecting…', 'connecting');
  const conn = new RTCPeerConnection(Object.assign({iceServers: []}, cfg.rtc_configuration || {}));
  pc = conn;
  try {
    if (cfg.rtc_configuration_dynamic && server && server.rtc_configuration) {
      const dyn = await server.rtc_configuration(null);
      if (dyn && typeof dyn === 'object') conn.setConfiguration(Object.assign({iceServers: []}, dyn));
    }
    if (cfg.audio) {
      audioCtx = new (window.AudioContext || window.webkitAudioContext)();
      audioCtx.resume().catch(() => {});
    }
    dc = conn.createDataChannel('text');  // before the offer, as the server expects
    dc.onmessage = (e) => onMessage(e.data);
    dc.onclose = () => { if (pc === conn && state.webrtcId) stop('Connection closed'); };
    conn.ontrack = (e) => onTrack(e.track);
    conn.onconnectionstatechange = () => {
      state.connectionState = conn.connectionState;
      if (pc !== conn) return;
      if (conn.connectionState === 'connected') setStatus(cfg.video ? 'Streaming' : 'Listening', 'streaming');
      else if (conn.connectionState === 'failed') fail(new Error('connection failed'));
    };
    if (cfg.mode !== 'receive') {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia)
        throw new Error('camera and microphone need HTTPS or localhost');
      localStream = await navigator.mediaDevices.getUserMedia(constraints());
      if (pc !== conn) { localStream.getTracks().forEach((t) => t.stop()); return; }
      if (localVideo) localVideo.srcObject = localStream;
      if (cfg.audio && localStream.getAudioTracks().length) meters.mic = meter(localStream);
      const direction = cfg.mode === 'send' ? 'sendonly' : 'sendrecv';
      for (const t of localStream.getTracks()) conn.addTransceiver(t, {direction, streams: [localStream]});
    } else {
      if (cfg.video) conn.addTransceiver('video', {direction: 'recvonly'});
      if (cfg.audio) conn.addTransceiver('audio', {direction: 'recvonly'});
    }
    timer = setInterval(tick, 100);
    const late = [];
    let answered = false, offered = false, id = null;
    // Offer and candidates go through this page's own Gradio session (server functions),
    // which binds the connection to the page: other pages cannot drive it.
    const postCandidate = (c) => server.ui_candidate({webrtc_id: id, candidate: c}).catch(() => {});
    conn.onicecandidate = (e) => {
      if (!e.candidate || !offered) return;  // gathered before the offer: already in its SDP
      if (answered) postCandidate(e.candidate.toJSON()); else late.push(e.candidate.toJSON());
    };
    await conn.setLocalDescription(await conn.createOffer());
    await gathered(conn, 2000);
    if (pc !== conn) return;
    const sdp = conn.localDescription.sdp;
    offered = true;
    let body = null;
    try { body = await server.ui_offer({sdp, type: 'offer'}); } catch (e) { throw new Error('offer failed: ' + ((e && e.message) || e)); }
    if (!body || body.status === 'failed' || !body.sdp) throw new Error(refusal(body, body && body._status));
    id = body.webrtc_id;
    if (pc !== conn) { server.ui_stop({webrtc_id: id}).catch(() => {}); return; }
    await conn.setRemoteDescription({type: body.type || 'answer', sdp: body.sdp});
    answered = true;
    late.splice(0).forEach(postCandidate);
    state.webrtcId = id;
    root.dataset.webrtcId = id;
    btn.textContent = 'Stop';
    btn.disabled = false;
    if (conn.connectionState !== 'connected') setStatus('Connecting…', 'connecting');
    addLog('Connected (' + id.slice(0, 8) + ')');
    trigger('play', {webrtc_id: id});
  } catch (err) {
    if (pc === conn) fail(err);
  }
}
function stop(reason, kind) {
  const id = state.webrtcId;
  const conn = pc;
  pc = null; dc = null;
  if (conn) { try { conn.close(); } catch (e) {} }
  if (localStream) localStream.getTracks().forEach((t) => t.stop());
  localStream = null;
  for (const el of [localVideo, remoteVideo, remoteAudio]) if (el) el.srcObject = null;
  for (const k in meters) { try { meters[k].src.disconnect(); } catch (e) {} }
  meters = {};
  if (timer) clearInterval(timer);
  timer = null;
  tick();
  if (audioCtx) { audioCtx.close().catch(() => {}); audioCtx = null; }
  state.webrtcId = null;
  delete root.dataset.webrtcId;
  btn.textContent = 'Start';
  btn.disabled = false;
  setStatus(reason || 'Stopped', kind || 'idle');
  if (id) { addLog(reason || 'Stopped'); server.ui_stop({webrtc_id: id}).catch(() => {}); }
}
function fail(err) {
  const text = 'Error: ' + ((err && err.message) || err);
  state.errors.push(text);
  stop(text, 'error');
  addLog(text, 'brtc-error');
}
btn.addEventListener('click', () => { if (pc) stop(); else start(); });
window.addEventListener('pagehide', () => { if (pc) stop('Page closed'); });
