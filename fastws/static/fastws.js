/**
 * fastws browser client: channels over one WebSocket that outlives its
 * connections.
 *
 *     import { connect } from "http://localhost:8080/fastws.js";
 *     const client = connect("ws://localhost:8080/ws");
 *     const news = client.subscribe("news");
 *     for await (const item of news) {
 *       if (item.reset) refetchState(); // publications were missed for good
 *       else show(item.seq, item.data);
 *     }
 *
 * One dependency-free ES module, no build step; the node serves it at
 * GET /fastws.js. The wire contract it speaks is docs/protocol.md, and
 * docs/client-js.md is its manual.
 *
 * What it promises:
 * - A subscription yields each publication once, in seq order, across any
 *   number of reconnects: it re-subscribes with `since` (the last position
 *   it delivered), the node replays what was missed, and duplicates are
 *   dropped by seq.
 * - When the node cannot replay (a new epoch, or history that no longer
 *   reaches back), the subscription yields `{reset: true, epoch, seq}` and
 *   goes on from there: the page must refetch its state, it is never
 *   handed a silent gap.
 * - `publish` is at least once: a publication not acknowledged when the
 *   connection dropped is sent again on the next one, so the node may have
 *   it twice (with two seqs) if the first copy arrived.
 *
 * @module fastws
 */

/**
 * @typedef {object} Options
 * @property {number} [minDelay=250] ms; the first reconnect waits up to this long.
 * @property {number} [maxDelay=30000] ms; the cap of the exponential backoff.
 * @property {number} [heartbeatTimeout=30000] ms without any frame from the
 *   node after which the connection is taken for dead and replaced; 0 turns
 *   the heartbeat (and the connect timeout) off.
 * @property {(state: State) => void} [onState] called on every change of
 *   `client.state`.
 */

/** @typedef {"connecting" | "open" | "closed"} State */
/** @typedef {{epoch: string, seq: number}} Position */
/** @typedef {{seq: number, data: any}} Publication */
/** @typedef {{reset: true, epoch: string, seq: number}} Reset */

const DEFAULTS = { minDelay: 250, maxDelay: 30000, heartbeatTimeout: 30000 };

/**
 * The channel the heartbeat unsubscribes from. Browsers cannot send a
 * WebSocket ping, and the node's own pings are answered by the browser
 * without telling the page, so a silent connection is probed with the
 * cheapest command that has a reply: leaving a channel one never joined
 * touches nothing but this connection. Do not subscribe to it.
 */
export const HEARTBEAT_CHANNEL = "$fastws.heartbeat";

/** Close codes after which reconnecting would only be refused again. */
const FINAL_CLOSE_CODES = new Set([1008]);

/**
 * The reason of the node's 1008 close when the connection's token expired.
 * With a url function the client reconnects, and the function gives the
 * new connection a fresh `?token=`.
 */
const TOKEN_EXPIRED = "token expired";

/**
 * An error reply from the node (`code` is its error code, such as
 * "bad_request" or "forbidden"), or the client's own: "closed" when the
 * client was closed before the command was answered (`closeCode` is set
 * when the node closed it for good), "message_too_big" for a publish in
 * flight when the node closed with 1009, "already_subscribed", "bad_url".
 */
export class FastwsError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {number} [closeCode]
   */
  constructor(code, message, closeCode) {
    super(message);
    this.name = "FastwsError";
    this.code = code;
    if (closeCode !== undefined) this.closeCode = closeCode;
  }
}

/**
 * Start a client. It connects at once and keeps reconnecting until
 * `close()` or a 1008 close (but for a close at token expiry when `url` is
 * a function: that one reconnects with the function's fresh token).
 *
 * @param {string | (() => string | Promise<string>)} url the node's
 *   channel endpoint, `ws://host:port/ws`; or a function called before
 *   every attempt, the place to put a fresh `?token=` (docs/auth.md).
 * @param {Options} [options]
 * @returns {Client}
 */
export function connect(url, options = {}) {
  return new Client(url, options);
}

export class Client {
  #url;
  #options;
  /** @type {WebSocket | null} the current socket; handlers of older ones are ignored */
  #ws = null;
  /** @type {State} */
  #state = "connecting";
  #attempt = 0;
  #retryTimer = 0;
  #tickTimer = 0;
  #nextId = 1;
  /** @type {Map<number, {kind: "sub", sub: Subscription} | {kind: "pub", pub: PendingPub} | {kind: "probe"} | {kind: "refresh", resolve: Function, reject: Function}>} */
  #replies = new Map();
  /** @type {Map<string, Subscription>} */
  #subs = new Map();
  /** @type {PendingPub[]} unacknowledged publishes, oldest first */
  #pubs = [];
  #startedAt = 0;
  #lastFrameAt = 0;
  #probeAt = 0;

  /**
   * Use `connect()`.
   * @param {string | (() => string | Promise<string>)} url
   * @param {Options} options
   */
  constructor(url, options) {
    this.#url = url;
    this.#options = { ...DEFAULTS, ...options };
    const timeout = this.#options.heartbeatTimeout;
    if (timeout > 0) {
      // One coarse timer rather than one reset per frame: a frame costs a
      // clock read, and the check runs four times per timeout.
      this.#tickTimer = setInterval(() => this.#tick(), Math.max(25, timeout / 4));
    }
    this.#open();
  }

  /** @returns {State} "connecting" (also while waiting to retry), "open" or "closed". */
  get state() {
    return this.#state;
  }

  /**
   * Subscribe to a channel. The returned subscription is an async iterable
   * of publications and reset items; it lasts across reconnects.
   *
   * @param {string} channel
   * @param {{since?: Position}} [options] resume from a position saved
   *   earlier (`sub.position`), for example across a page reload.
   * @returns {Subscription}
   */
  subscribe(channel, options = {}) {
    if (this.#state === "closed") throw new FastwsError("closed", "the client is closed");
    if (this.#subs.has(channel)) {
      throw new FastwsError("already_subscribed", `already subscribed to ${channel}`);
    }
    const sub = new Subscription(channel, options.since ?? null, (s) => this.#unsubscribe(s));
    this.#subs.set(channel, sub);
    if (this.#isOpen()) this.#sendSub(sub);
    return sub;
  }

  /**
   * Publish `data` (any JSON value) to a channel.
   *
   * While the client is disconnected the publication waits, and one sent
   * but not acknowledged when the connection dropped is sent again: at
   * least once, so a receiver that must not apply it twice needs an id of
   * its own in `data`.
   *
   * @param {string} channel
   * @param {any} data
   * @returns {Promise<number>} the publication's seq; rejects with a
   *   FastwsError whose `code` is the node's error code.
   */
  publish(channel, data) {
    if (this.#state === "closed") {
      return Promise.reject(new FastwsError("closed", "the client is closed"));
    }
    return new Promise((resolve, reject) => {
      /** @type {PendingPub} */
      const pub = { channel, data, resolve, reject, sent: false };
      this.#pubs.push(pub);
      if (this.#isOpen()) this.#sendPub(pub);
    });
  }

  /**
   * Hand the node a fresh token before the connection's token expires
   * (docs/auth.md); the node then keeps the connection open past the old
   * token's expiry. New connections still take their token from the url
   * (give `connect()` a function that puts a fresh one in). While no
   * connection is up there is nothing to refresh and it resolves at once.
   *
   * @param {string} token
   * @returns {Promise<void>} rejects with a FastwsError, code "forbidden"
   *   when the node refuses the token (invalid, expired, another user).
   */
  refresh(token) {
    if (this.#state === "closed") {
      return Promise.reject(new FastwsError("closed", "the client is closed"));
    }
    if (!this.#isOpen()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.#command({ op: "refresh", token }, { kind: "refresh", resolve, reject });
    });
  }

  /**
   * Close for good: subscriptions end (their loops finish), and publishes
   * not yet acknowledged reject with code "closed".
   */
  close() {
    this.#finish(null);
  }

  // connection lifecycle

  async #open() {
    this.#setState("connecting");
    let url;
    try {
      url = typeof this.#url === "function" ? await this.#url() : this.#url;
    } catch (error) {
      console.warn("fastws: the url function failed:", error);
      this.#retry();
      return;
    }
    if (this.#state === "closed") return;
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (error) {
      // A malformed URL throws at once; it would throw on every retry.
      this.#finish(new FastwsError("bad_url", String(error?.message ?? error)));
      return;
    }
    this.#ws = ws;
    this.#startedAt = this.#lastFrameAt = performance.now();
    this.#probeAt = 0;
    ws.onopen = () => ws === this.#ws && this.#opened();
    ws.onmessage = (event) => ws === this.#ws && this.#received(event.data);
    ws.onclose = (event) => ws === this.#ws && this.#lost(event.code, event.reason);
    // An error event is always followed by a close event, which is handled.
    ws.onerror = () => {};
  }

  #isOpen() {
    return this.#ws !== null && this.#ws.readyState === WebSocket.OPEN;
  }

  #opened() {
    this.#attempt = 0;
    this.#lastFrameAt = performance.now();
    this.#setState("open");
    // Subscriptions first, so that a page publishing to a channel it
    // listens to sees its own publications; then the publishes, in order.
    for (const sub of this.#subs.values()) this.#sendSub(sub);
    for (const pub of this.#pubs) this.#sendPub(pub);
  }

  /**
   * The connection is gone (closed, or abandoned by the heartbeat): forget
   * what was in flight on it, then retry unless the close was final.
   */
  #lost(code, reason) {
    const ws = this.#ws;
    this.#ws = null;
    if (ws !== null && ws.readyState !== WebSocket.CLOSED) {
      // Abandoned, not closed: detach it so that its late events are
      // ignored, and do not wait for its closing handshake.
      ws.onopen = ws.onmessage = ws.onclose = null;
      try {
        ws.close(4000, reason);
      } catch {
        // already closing
      }
    }
    // A refresh in flight is moot: the next connection presents its own token.
    this.#settleRefreshes(null);
    this.#replies.clear();
    for (const sub of this.#subs.values()) sub._active = false;
    const unsent = [];
    for (const pub of this.#pubs) {
      if (pub.sent && code === 1009) {
        // One of these was too large for the node; sending it again would
        // close the next connection too.
        pub.reject(new FastwsError("message_too_big", "the node refused a message as too big", code));
      } else {
        pub.sent = false;
        unsent.push(pub);
      }
    }
    this.#pubs = unsent;
    const renewable = reason === TOKEN_EXPIRED && typeof this.#url === "function";
    if (FINAL_CLOSE_CODES.has(code) && !renewable) {
      this.#finish(new FastwsError("closed", reason || `closed by the node with ${code}`, code));
      return;
    }
    this.#retry();
  }

  /** Resolve (error null) or reject every refresh still waiting for its reply. */
  #settleRefreshes(error) {
    for (const pending of this.#replies.values()) {
      if (pending.kind !== "refresh") continue;
      if (error === null) pending.resolve();
      else pending.reject(error);
    }
  }

  /** Wait, then connect again: exponential backoff with full jitter. */
  #retry() {
    if (this.#state === "closed") return;
    this.#setState("connecting");
    const { minDelay, maxDelay } = this.#options;
    const ceiling = Math.min(maxDelay, minDelay * 2 ** Math.min(this.#attempt, 30));
    this.#attempt += 1;
    // Full jitter: clients cut off together do not come back together.
    this.#retryTimer = setTimeout(() => this.#open(), Math.random() * ceiling);
  }

  /** End the client: error is null for close(), the reason otherwise. */
  #finish(error) {
    if (this.#state === "closed") return;
    clearTimeout(this.#retryTimer);
    clearInterval(this.#tickTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws !== null) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) {
        ws.close(1000);
      }
    }
    const rejection = error ?? new FastwsError("closed", "the client is closed");
    this.#settleRefreshes(rejection);
    this.#replies.clear();
    for (const pub of this.#pubs) pub.reject(rejection);
    this.#pubs = [];
    for (const sub of this.#subs.values()) sub._end(error);
    this.#subs.clear();
    this.#setState("closed");
  }

  /**
   * The heartbeat and the connect timeout. A connection that has been
   * silent for half the timeout is probed; one that then stays silent for
   * the other half is replaced. Deciding on "a probe went unanswered" and
   * not on silence alone keeps a page whose timers were throttled (a
   * background tab) from dropping healthy connections.
   */
  #tick() {
    const ws = this.#ws;
    if (ws === null) return;
    const now = performance.now();
    const timeout = this.#options.heartbeatTimeout;
    if (ws.readyState === WebSocket.CONNECTING) {
      if (now - this.#startedAt >= timeout) this.#lost(4000, "connect timeout");
      return;
    }
    if (ws.readyState === WebSocket.CLOSING) {
      // The node began a close; should its end never come, do not wait for it.
      if (now - this.#lastFrameAt >= timeout) this.#lost(4000, "close timeout");
      return;
    }
    if (ws.readyState !== WebSocket.OPEN) return; // closed: its close event is on the way
    if (this.#probeAt > this.#lastFrameAt) {
      if (now - this.#probeAt >= timeout / 2) this.#lost(4000, "heartbeat timeout");
    } else if (now - this.#lastFrameAt >= timeout / 2) {
      this.#probeAt = now;
      this.#command({ op: "unsub", ch: HEARTBEAT_CHANNEL }, { kind: "probe" });
    }
  }

  #setState(state) {
    if (state === this.#state) return;
    this.#state = state;
    try {
      this.#options.onState?.(state);
    } catch (error) {
      console.error("fastws: onState threw:", error);
    }
  }

  // commands

  #command(message, pending) {
    const id = this.#nextId++;
    this.#replies.set(id, pending);
    this.#ws.send(JSON.stringify({ ...message, id }));
  }

  #sendSub(sub) {
    sub._active = false;
    const message = { op: "sub", ch: sub.channel };
    if (sub._position !== null) message.since = sub._position;
    this.#command(message, { kind: "sub", sub });
  }

  /**
   * The node's backplane is down: resubscribe later, on this connection,
   * keeping the position; retries back off as reconnects do.
   */
  #retrySub(sub) {
    const { minDelay, maxDelay } = this.#options;
    sub._retries += 1;
    const ceiling = Math.min(maxDelay, minDelay * 2 ** Math.min(sub._retries, 30));
    const ws = this.#ws;
    setTimeout(() => {
      if (this.#ws === ws && this.#isOpen() && this.#subs.get(sub.channel) === sub) {
        this.#sendSub(sub);
      }
    }, Math.random() * ceiling);
  }

  #sendPub(pub) {
    pub.sent = true;
    this.#command({ op: "pub", ch: pub.channel, data: pub.data }, { kind: "pub", pub });
  }

  #unsubscribe(sub) {
    if (this.#subs.get(sub.channel) !== sub) return;
    this.#subs.delete(sub.channel);
    // No id: the node answers only if it fails, and there is nothing to do then.
    if (this.#isOpen()) this.#ws.send(JSON.stringify({ op: "unsub", ch: sub.channel }));
  }

  // frames from the node

  #received(text) {
    this.#lastFrameAt = performance.now();
    if (typeof text !== "string") return; // the node sends only TEXT frames
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    if (message === null || typeof message !== "object") return;
    if ("id" in message) {
      this.#reply(message);
    } else if (typeof message.ch === "string" && typeof message.seq === "number") {
      this.#publication(message);
    }
    // welcome, join and leave need nothing from this client
  }

  #reply(message) {
    const pending = this.#replies.get(message.id);
    if (pending === undefined) return;
    this.#replies.delete(message.id);
    const error = message.error
      ? new FastwsError(message.error.code, message.error.message)
      : null;
    if (pending.kind === "refresh") {
      if (error) pending.reject(error);
      else pending.resolve();
    } else if (pending.kind === "pub") {
      const index = this.#pubs.indexOf(pending.pub);
      if (index >= 0) this.#pubs.splice(index, 1);
      if (error) pending.pub.reject(error);
      else pending.pub.resolve(message.seq);
    } else if (pending.kind === "sub") {
      const sub = pending.sub;
      if (this.#subs.get(sub.channel) !== sub) return; // unsubscribed meanwhile
      if (error && error.code === "unavailable" && sub._position !== null) {
        this.#retrySub(sub);
        return;
      }
      if (error) {
        this.#subs.delete(sub.channel);
        sub._end(error);
        return;
      }
      sub._retries = 0;
      if (!message.recovered) {
        // Not recovered is news only when a position was asked for; the
        // first subscription simply starts at the channel's end.
        if (sub._position !== null) {
          sub._push({ reset: true, epoch: message.epoch, seq: message.seq });
        }
        sub._position = { epoch: message.epoch, seq: message.seq };
      }
      // Recovered: the position stays, and the replay that follows the
      // reply carries on from it.
      sub._active = true;
    }
  }

  #publication(message) {
    const sub = this.#subs.get(message.ch);
    // Before the reply to its sub, a channel's frames belong to an older
    // subscription; the reply and its replay cover them.
    if (sub === undefined || !sub._active) return;
    const last = sub._position.seq;
    if (message.seq <= last) return; // a duplicate, delivered already
    if (message.seq > last + 1) {
      // The contract rules gaps out; should one happen, a new connection
      // re-subscribes from the last delivered position and fills it.
      console.warn(`fastws: ${message.ch} jumped from seq ${last} to ${message.seq}; resyncing`);
      this.#lost(4000, "gap");
      return;
    }
    sub._position = { epoch: sub._position.epoch, seq: message.seq };
    sub._push({ seq: message.seq, data: message.data });
  }
}

/**
 * @typedef {object} PendingPub
 * @property {string} channel
 * @property {any} data
 * @property {(seq: number) => void} resolve
 * @property {(error: Error) => void} reject
 * @property {boolean} sent whether it went out on the current connection
 */

/**
 * One channel's subscription: an async iterable of `{seq, data}` and
 * `{reset: true, epoch, seq}` items. Items wait in memory until the page
 * takes them; leaving a `for await` loop (break, return, throw)
 * unsubscribes.
 */
export class Subscription {
  /** @type {Position | null} fields with _ are the client's, not the page's */
  _position;
  /** whether the sub sent on this connection was answered */
  _active = false;
  /** resubscriptions answered `unavailable` in a row */
  _retries = 0;
  #channel;
  #onUnsubscribe;
  /** @type {(Publication | Reset)[]} */
  #items = [];
  /** @type {{resolve: Function, reject: Function}[]} */
  #waiters = [];
  #done = false;
  /** @type {Error | null} */
  #error = null;

  /**
   * Made by `client.subscribe()`.
   * @param {string} channel
   * @param {Position | null} since
   * @param {(sub: Subscription) => void} onUnsubscribe
   */
  constructor(channel, since, onUnsubscribe) {
    this.#channel = channel;
    this._position = since;
    this.#onUnsubscribe = onUnsubscribe;
  }

  /** @returns {string} */
  get channel() {
    return this.#channel;
  }

  /**
   * The last delivered position, which a reconnect resumes from; null
   * until the first reply. Save it to resume with `subscribe(ch, {since})`.
   * @returns {Position | null}
   */
  get position() {
    return this._position;
  }

  /** Stop receiving; a waiting loop finishes, items not yet taken are dropped. */
  unsubscribe() {
    this.#items = [];
    this.#onUnsubscribe(this);
    this._end(null);
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  /** @returns {Promise<IteratorResult<Publication | Reset>>} */
  next() {
    if (this.#items.length > 0) {
      return Promise.resolve({ value: this.#items.shift(), done: false });
    }
    if (this.#error !== null) return Promise.reject(this.#error);
    if (this.#done) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  /** Called when a `for await` loop is left early. */
  return() {
    this.unsubscribe();
    return Promise.resolve({ value: undefined, done: true });
  }

  /** @param {Publication | Reset} item */
  _push(item) {
    if (this.#done) return;
    const waiter = this.#waiters.shift();
    if (waiter !== undefined) waiter.resolve({ value: item, done: false });
    else this.#items.push(item);
  }

  /** Finish: done, or with error once the items already here are taken. */
  _end(error) {
    if (this.#done) return;
    this.#done = true;
    this.#error = error;
    for (const waiter of this.#waiters.splice(0)) {
      if (error !== null) waiter.reject(error);
      else waiter.resolve({ value: undefined, done: true });
    }
  }
}
