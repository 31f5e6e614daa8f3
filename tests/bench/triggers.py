"""Benchmark ``triggers``: the signed-trigger verifier's speed, and what it refuses.

- ``trigger_verify_per_s``: valid trigger envelopes (pre-signed, distinct
  nonces, as bytes the way they arrive over HTTP) verified per second by
  :func:`provisioning.triggers.verify_trigger` on one thread, with a
  :class:`MemoryReplayCache` and :class:`Challenges`. Peer, same run,
  interleaved: raw ``cryptography`` Ed25519 ``verify`` of the same payload
  bytes and signatures (``raw_ed25519_verify_per_s``): the floor of any
  verifier, so the ratio is what parsing and the rules cost on top. Each loop
  is bounded in count (the envelopes made) and in time; median of the rounds.
- ``fuzz_cases_rejected``: a valid envelope is accepted once, then N mutants
  of it (a seeded ``random.Random``) go through ``verify_trigger``: byte
  flips, sets, inserts and deletes of the envelope; payload fields changed,
  removed or added, or its times shifted, and then carried with the original
  signature, re-signed by a key nobody enrolled, or re-signed by the enrolled
  key with the original (already used) nonce kept; envelope fields swapped,
  dropped, added or padded. Every one must be rejected; peer: the cases
  generated (ratio 1.0 = all rejected).
  ``fuzz_cases_accepted`` must be 0 (peer: that physical limit, 0; ratio 1.0
  when both are 0). An accepted mutant raises: the benchmark could not run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provisioning import documents as d
from provisioning.keys import kid, raw_public
from provisioning.triggers import (
    Accepted,
    Challenges,
    Keyring,
    MemoryReplayCache,
    Rejected,
    parse_key_list,
    sign_key_list,
    sign_trigger,
    verify_trigger,
)
from tests.bench.common import Figure, figure
from tests.mutations import HOWS, mutate

BENCH = "triggers"
NOW = 1_800_000_000
BUILDING = "lincoln-elementary"
SEED = 20261128

log = logging.getLogger("bench.triggers")


class Trust:
    """A district's trigger-key list (a dispatch and a principal key) and a device's state."""

    def __init__(self) -> None:
        self.dispatch = Ed25519PrivateKey.generate()
        self.principal = Ed25519PrivateKey.generate()
        authority = Ed25519PrivateKey.generate()
        entries = [
            {"key": d.b64url(raw_public(k.public_key())), "role": r, "buildings": b, "label": r}
            for k, r, b in (
                (self.dispatch, "dispatch", "all"),
                (self.principal, "principal", [BUILDING]),
            )
        ]
        envelope = sign_key_list(authority, 1, entries, iat=NOW - 10, exp=NOW + 86400)
        self.keyring = Keyring()
        self.keyring.install(parse_key_list(json.dumps(envelope), authority.public_key()), NOW)
        self.replay = MemoryReplayCache()
        self.challenges = Challenges()

    def verify(self, body: bytes) -> Accepted | Rejected:
        return verify_trigger(
            body,
            building=BUILDING,
            keyring=self.keyring,
            now=NOW,
            mono=100.0,
            replay=self.replay,
            challenges=self.challenges,
        )


# -- verification rate ---------------------------------------------------------------------


def _rate(step: Callable[[int], object], count: int, max_s: float) -> tuple[float, int]:
    """Calls of ``step(i)`` per second for i in 0..count-1, stopping early after ``max_s``."""
    t0 = time.perf_counter()
    n = 0
    while n < count:
        step(n)
        n += 1
        if n % 256 == 0 and time.perf_counter() - t0 >= max_s:
            break
    return n / (time.perf_counter() - t0), n


def verify_rate(count: int, rounds: int, max_s: float) -> Figure:
    """``verify_trigger`` vs bare Ed25519 verify over the same pre-signed envelopes."""
    cpus = os.sched_getaffinity(0)  # 0: this thread, on Linux
    os.sched_setaffinity(0, {min(cpus)})  # one core, both loops
    try:
        return _verify_rate(count, rounds, max_s)
    finally:
        os.sched_setaffinity(0, cpus)


def _verify_rate(count: int, rounds: int, max_s: float) -> Figure:
    trust = Trust()
    t0 = time.perf_counter()
    envelopes = [
        sign_trigger(trust.dispatch, action="start", building=BUILDING, reason="911 call", now=NOW)
        for _ in range(count)
    ]
    bodies = [json.dumps(e).encode() for e in envelopes]
    parsed = [d.parse_envelope(b) for b in bodies]
    raw = [(e.sig, e.payload) for e in parsed]
    public = trust.dispatch.public_key()
    log.info("signed %d triggers in %.2f s", count, time.perf_counter() - t0)

    ours: list[float] = []
    peer: list[float] = []
    results: list[object] = []

    def step(i: int) -> None:
        results.append(trust.verify(bodies[i]))

    for _ in range(rounds):
        trust.replay = MemoryReplayCache()  # the same nonces are fresh again each round
        results.clear()
        rate, n = _rate(step, count, max_s)
        accepted = sum(isinstance(r, Accepted) for r in results)
        if accepted != n:
            raise RuntimeError(f"only {accepted} of {n} valid triggers were accepted")
        ours.append(rate)
        peer.append(_rate(lambda i: public.verify(*raw[i]), count, max_s)[0])
    log.info(
        "verify_trigger: %s /s; raw Ed25519 verify: %s /s",
        " ".join(f"{x:.0f}" for x in ours),
        " ".join(f"{x:.0f}" for x in peer),
    )
    return figure(
        BENCH,
        "trigger_verify_per_s",
        statistics.median(ours),
        "envelopes_per_s",
        "raw_ed25519_verify_per_s",
        statistics.median(peer),
    )


# -- mutation fuzzing ----------------------------------------------------------------------

FIELDS = ("type", "v", "iat", "exp", "action", "building", "cameras", "reason", "nonce")
SPECIALS: tuple[Any, ...] = (
    "start",
    "extend",
    "end",
    "all",
    BUILDING,
    "jefferson-high",
    "",
    "trigger",
    "trigger_keys",
    0,
    1,
    2,
    -1,
    NOW,
    NOW + 301,
    NOW - 1000,
    NOW + 1000,
    2**40 + 1,
    1.0,
    float(NOW),
    True,
    False,
    None,
    [],
    {},
    ["hallway-2", "hallway-2"],
    ["Hallway"],
    "bm9uY2U",
    "bm9uY2Utbm9uY2Utbm9uY2U=",
    "Y2hhbGxlbmdlLWNoYWxsZW5nZQ",
    "x" * 501,
    "x" * 5000,
)
ALPHABET = 'abcXYZ019-_=+/ "\\\n\t\x00\x7f\u00e9\u2028\U0001f6a8{}[]:,.'


class Mutator:
    """Seeded mutants of one valid envelope (the generators of tests/test_triggers.py)."""

    def __init__(self, rng: random.Random, signer: Ed25519PrivateKey, other_kid: str) -> None:
        self.rng = rng
        self.signer = signer
        self.other_kid = other_kid
        self.outsider = Ed25519PrivateKey.generate()
        self.signed = sign_trigger(
            signer, action="start", building=BUILDING, reason="911 call", now=NOW
        )
        self.original = json.dumps(self.signed).encode()
        self.payload: dict[str, Any] = json.loads(d.parse_envelope(self.original).payload)

    def text(self, max_len: int) -> str:
        return "".join(self.rng.choice(ALPHABET) for _ in range(self.rng.randrange(max_len + 1)))

    def value(self) -> Any:
        rng = self.rng
        kind = rng.randrange(6)
        if kind == 0:
            return rng.choice(SPECIALS)
        if kind == 1:
            return rng.randint(-(2**64), 2**64)
        if kind == 2:
            return rng.uniform(-1e12, 1e12)
        if kind == 3:
            return self.text(40)
        if kind == 4:
            return [self.text(8) for _ in range(rng.randrange(4))]
        return rng.randint(0, 2**40)

    def bytes_mutant(self) -> tuple[str, bytes]:
        rng, original = self.rng, self.original
        at = rng.randrange(len(original))
        how = rng.choice(HOWS)
        byte = rng.randrange(256)
        mutant = mutate(original, at, how, byte)
        return f"bytes_{how}", mutant

    def field_mutant(self) -> tuple[str, bytes]:
        rng = self.rng
        how = rng.choice(("original_sig", "outsider", "enrolled"))
        doc = dict(self.payload)
        targets = [*FIELDS, "extra", "challenge"]
        if how == "enrolled":
            # Signed by the enrolled key, a mutant may carry valid content: it must be
            # refused all the same because its nonce was used (the original was
            # accepted), so the nonce is never changed to a fresh one here.
            targets.remove("nonce")
        if how == "enrolled" and rng.random() < 0.25:
            # The same content and lifetime at another time: expired, not yet valid,
            # or (within the skew) replayed.
            shift = rng.choice((-1, 1)) * rng.choice((30, 60, 61, 120, 420, 86400, 10**6))
            doc["iat"] += shift
            doc["exp"] += shift
        else:
            field = rng.choice(targets)
            special = how == "enrolled" and rng.random() < 0.5  # past the schema, to the rules
            while True:
                value = rng.choice(SPECIALS) if special else self.value()
                if value is None:
                    doc.pop(field, None)
                else:
                    doc[field] = value
                if doc != self.payload:
                    break
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        if how == "original_sig":
            sig, key_id = self.signed["sig"], self.signed["kid"]
        else:
            key = self.outsider if how == "outsider" else self.signer
            sig, key_id = d.b64url(key.sign(data)), kid(key.public_key())
        body = {"payload": d.b64url(data), "kid": key_id, "sig": sig}
        return f"field_{how}", json.dumps(body).encode()

    def envelope_mutant(self) -> tuple[str, bytes]:
        rng = self.rng
        doc: dict[str, Any] = dict(self.signed)
        how = rng.choice(("kid", "drop", "extra", "value", "padding", "not_object"))
        if how == "kid":
            doc["kid"] = self.other_kid  # an enrolled key that did not sign it
        elif how == "drop":
            doc.pop(rng.choice(("payload", "kid", "sig")))
        elif how == "extra":
            doc[rng.choice(("payload2", "alg", "Kid", ""))] = self.value()
        elif how == "value":
            doc[rng.choice(("payload", "kid", "sig"))] = self.value()
        elif how == "padding":
            name = rng.choice(("payload", "sig"))
            doc[name] = doc[name] + "=" * rng.randint(1, 2)
        else:
            return f"envelope_{how}", json.dumps([doc]).encode()
        return f"envelope_{how}", json.dumps(doc).encode()

    def mutant(self) -> tuple[str, bytes]:
        """One mutant, never the original bytes."""
        while True:
            roll = self.rng.random()
            if roll < 0.5:
                kind, body = self.bytes_mutant()
            elif roll < 0.9:
                kind, body = self.field_mutant()
            else:
                kind, body = self.envelope_mutant()
            if body != self.original:
                return kind, body


def fuzz(count: int) -> list[Figure]:
    """``count`` mutants after the original was accepted once; every one must be rejected."""
    trust = Trust()
    mutator = Mutator(random.Random(SEED), trust.principal, kid(trust.dispatch.public_key()))
    first = trust.verify(mutator.original)
    if not isinstance(first, Accepted):
        raise RuntimeError(f"the original envelope was not accepted: {first}")
    codes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    accepted: list[tuple[str, bytes]] = []
    t0 = time.perf_counter()
    for _ in range(count):
        kind, body = mutator.mutant()
        kinds[kind] += 1
        result = trust.verify(body)
        if isinstance(result, Accepted):
            accepted.append((kind, body))
        else:
            codes[result.code] += 1
    elapsed = time.perf_counter() - t0
    log.info("fuzz: %d mutants in %.1f s; kinds %s", count, elapsed, dict(sorted(kinds.items())))
    log.info("fuzz: rejected by code %s", dict(codes.most_common()))
    if accepted:
        kind, body = accepted[0]
        raise RuntimeError(f"{len(accepted)} mutant(s) accepted, e.g. {kind}: {body[:300]!r}")
    rejected = sum(codes.values())
    return [
        figure(
            BENCH, "fuzz_cases_rejected", rejected, "cases", "fuzz_cases_generated", float(count)
        ),
        # At the physical limit (0 of 0): ratio 1.0 by convention (figure() would say inf).
        {
            **figure(BENCH, "fuzz_cases_accepted", 0, "cases", "physical_limit", 1),
            "peer_value": 0,
            "ratio": 1.0,
        },
    ]


async def run(smoke: bool) -> list[Figure]:
    """Both figures: a few hundred envelopes and mutants in smoke mode."""
    if smoke:
        count, rounds, max_s, mutants = 300, 1, 0.2, 500
    else:
        count, rounds, max_s, mutants = 20_000, 5, 2.0, 100_000
    figures = [await asyncio.to_thread(verify_rate, count, rounds, max_s)]
    figures += await asyncio.to_thread(fuzz, mutants)
    return figures
