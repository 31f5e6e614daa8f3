// The emergency alarm: a siren through Web Audio and a flashing page title while any
// emergency is not acknowledged, and the "click to enable sound" control for browsers
// that block sound until the officer touches the page.
//
// Acknowledging is a mute on this computer only (kept in localStorage, per session):
// the red banner stays while the emergency lasts, and a new emergency rings again.

const ACK_KEY = "breakglass.acknowledged";
const MAX_ACKS = 200;
const TITLE = "breakglass receiver";
const FLASH_MS = 700;
const SIREN_HIGH_HZ = 960;
const SIREN_LOW_HZ = 770;
const SIREN_HALF_S = 0.45; // each tone
const SIREN_AHEAD_S = 2; // how far ahead the tones are scheduled on the audio clock
const SIREN_GAIN = 0.18;

function loadAcks() {
  try {
    const list = JSON.parse(localStorage.getItem(ACK_KEY) || "[]");
    return Array.isArray(list) ? list.filter((x) => typeof x === "string") : [];
  } catch (err) {
    return [];
  }
}

export class Alarm {
  // soundButton: the "click to enable sound" control (its data-state says what it does).
  constructor(soundButton) {
    this.soundButton = soundButton;
    this.acked = loadAcks();
    this.emergencies = []; // [{id, building}] open now
    this.offline = 0;
    this.ctx = null;
    this.osc = null;
    this.gain = null;
    this.scheduledUntil = 0;
    this.flashOn = false;
    this.makeContext();
    soundButton.addEventListener("click", () => this.enableSound(true));
    // Any first gesture on the page unlocks sound where autoplay is blocked.
    const unlock = () => this.enableSound(false);
    document.addEventListener("pointerdown", unlock, { capture: true });
    document.addEventListener("keydown", unlock, { capture: true });
    setInterval(() => this.flash(), FLASH_MS);
    setInterval(() => this.scheduleSiren(), 250);
    this.render();
  }

  makeContext() {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) return;
    try {
      this.ctx = new Ctx();
    } catch (err) {
      this.ctx = null;
      return;
    }
    this.ctx.addEventListener("statechange", () => this.render());
  }

  enableSound(beep) {
    if (!this.ctx) return;
    const ready = this.ctx.state === "running" ? Promise.resolve() : this.ctx.resume();
    ready.then(() => {
      if (beep && !this.ringing()) this.testBeep();
      this.render();
    }).catch(() => this.render());
  }

  testBeep() {
    const ctx = this.ctx;
    const osc = ctx.createOscillator();
    const gain = ctx.createGain();
    osc.frequency.value = SIREN_HIGH_HZ;
    gain.gain.value = SIREN_GAIN / 2;
    osc.connect(gain).connect(ctx.destination);
    osc.start();
    osc.stop(ctx.currentTime + 0.15);
  }

  isAcked(id) {
    return this.acked.includes(id);
  }

  acknowledge(id) {
    if (this.isAcked(id)) return;
    this.acked.push(id);
    this.acked = this.acked.slice(-MAX_ACKS);
    try {
      localStorage.setItem(ACK_KEY, JSON.stringify(this.acked));
    } catch (err) {
      // private mode or full: the mute holds for this page only
    }
    this.render();
  }

  // The open emergencies now ([{id, building}]) and the number of offline devices.
  update(emergencies, offline) {
    if (emergencies !== undefined) this.emergencies = emergencies;
    if (offline !== undefined) this.offline = offline;
    this.render();
  }

  unacked() {
    return this.emergencies.filter((e) => !this.isAcked(e.id));
  }

  ringing() {
    return this.unacked().length > 0;
  }

  soundState() {
    if (!this.ctx) return "unsupported";
    if (this.ctx.state !== "running") return "blocked";
    if (this.ringing()) return "ringing";
    return this.emergencies.length ? "acknowledged" : "ready";
  }

  render() {
    const state = this.soundState();
    const b = this.soundButton;
    b.dataset.state = state;
    b.hidden = state === "unsupported";
    b.textContent = {
      blocked: "Sound off: click to enable the alarm sound",
      ringing: "ALARM SOUNDING",
      acknowledged: "Alarm acknowledged (muted)",
      ready: "Alarm sound on",
    }[state] || "";
    b.title = state === "blocked"
      ? "This browser plays sound only after you touch the page"
      : "Click to test the alarm sound";
    b.classList.toggle("blocked", state === "blocked");
    if (!this.ringing()) this.stopSiren();
    else this.scheduleSiren();
    this.flash(true);
  }

  // The siren: two tones, scheduled ahead on the audio clock so a busy page keeps it even.
  scheduleSiren() {
    const ctx = this.ctx;
    if (!ctx || ctx.state !== "running" || !this.ringing()) return;
    if (!this.osc) {
      this.gain = ctx.createGain();
      this.gain.gain.value = SIREN_GAIN;
      this.osc = ctx.createOscillator();
      this.osc.type = "square";
      this.osc.connect(this.gain).connect(ctx.destination);
      this.osc.start();
      this.scheduledUntil = ctx.currentTime;
    }
    let t = Math.max(this.scheduledUntil, ctx.currentTime);
    while (t < ctx.currentTime + SIREN_AHEAD_S) {
      this.osc.frequency.setValueAtTime(SIREN_HIGH_HZ, t);
      this.osc.frequency.setValueAtTime(SIREN_LOW_HZ, t + SIREN_HALF_S);
      t += 2 * SIREN_HALF_S;
    }
    this.scheduledUntil = t;
  }

  stopSiren() {
    if (!this.osc) return;
    try {
      this.osc.stop();
    } catch (err) {
      // already stopped
    }
    this.osc.disconnect();
    this.gain.disconnect();
    this.osc = null;
    this.gain = null;
  }

  // The page title: flashing while an emergency is not acknowledged, steady otherwise.
  flash(keepPhase) {
    if (!keepPhase) this.flashOn = !this.flashOn;
    const open = this.unacked();
    let title = TITLE;
    if (open.length) {
      const where = open.map((e) => e.building).join(", ");
      title = this.flashOn ? `!!! EMERGENCY \u2014 ${where}` : `\u25CF\u25CF\u25CF EMERGENCY \u25CF\u25CF\u25CF`;
    } else if (this.emergencies.length) {
      title = `\u25CF EMERGENCY (acknowledged) \u2014 ${TITLE}`;
    } else if (this.offline) {
      title = `\u25CF ${this.offline} DEVICE(S) OFFLINE \u2014 ${TITLE}`;
    }
    if (document.title !== title) document.title = title;
    document.body.classList.toggle("alarming", open.length > 0);
  }
}
