"""Where the footage hash chain's signed checkpoints go (the chain: :mod:`agent.chain`).

Every packet is chained as it is numbered; each checkpoint the chain closes goes to the
sessions showing its footage. A session opens with the checkpoints of its pre-roll
(signed before the press), ends with its footage signed up to its last seq exactly,
and after a restart gets again the checkpoints the receiver had not answered. A sealed
segment carries the checkpoint over exactly its seqs (:func:`attest`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from agent import chain as hash_chain
from agent import protocol as p
from agent.uplink import SessionStream, UplinkClient
from hardware import EncodedPacket

log = logging.getLogger(__name__)


class Checkpoints:
    """Hands the chain's checkpoints to the uplink's sessions."""

    def __init__(self, chains: hash_chain.Chains, uplink: UplinkClient) -> None:
        self.chains = chains
        self.uplink = uplink

    def chain_packet(self, packet: EncodedPacket) -> None:
        """Chain every packet as it is numbered; checkpoints go to the sessions showing it."""
        made = self.chains.add(
            packet.camera,
            packet.seq,
            packet.capture_ns // 1000,
            packet.keyframe,
            packet.codec,
            packet.payload,
        )
        for cp in made:
            self.uplink.add_checkpoint(cp)

    def from_first(self, stream: SessionStream, camera: p.CameraDesc | None = None) -> None:
        """A new session's chain from each camera's first seq (or only ``camera``'s, one
        that joined it): its pre-roll's, signed before the press."""
        for d in stream.open.cameras if camera is None else (camera,):
            for cp in self.chains.since(d.id, d.first_seq):
                self.uplink.add_checkpoint(cp, stream)

    def cut(self, session_id: str) -> None:
        """An ended session's footage is signed up to its last seq, exactly."""
        stream = self.uplink.stream(session_id)
        if stream is None:
            return
        for desc in stream.open.cameras:
            end = stream.end_seq[desc.index]
            if end is not None:
                for cp in self.chains.cut(desc.id, end):
                    self.uplink.add_checkpoint(cp)

    def cut_live(self) -> None:
        """On the way out: sign the chain of every live session up to its last packet."""
        for stream in self.uplink.streams:
            for desc in stream.open.cameras:
                if stream.end_seq[desc.index] is None:
                    for cp in self.chains.cut(desc.id, stream.last_pushed[desc.index]):
                        self.uplink.add_checkpoint(cp)

    def restore(self, stream: SessionStream, owed: Mapping[str, Any] | None) -> None:
        """Checkpoints saved before a restart (in the session's entry in owed.json) that
        the receiver had not answered yet."""
        for record in [] if owed is None else owed.get("chain", []):
            try:
                cp = hash_chain.from_record(record)
            except ValueError as exc:
                log.error("session %s: a saved chain checkpoint is unreadable: %s", stream.id, exc)
                continue
            self.uplink.add_checkpoint(cp, stream)


def attest(chains: hash_chain.Chains, camera: str, first: int, last: int) -> dict[str, Any] | None:
    """The checkpoint a sealed segment carries over exactly its seqs (the store asks)."""
    cp = chains.span(camera, first, last)
    if cp is None:
        log.warning("segment %s %d..%d: chain no longer known; not signed", camera, first, last)
        return None
    return hash_chain.claim_json(cp)
