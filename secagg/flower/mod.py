"""The client side of secagg inside Flower: a Mod that decrypts what comes in and encrypts what goes out.

Register it FIRST in ``ClientApp(mods=[secagg_mod, ...])`` (Flower's first mod is the outermost), so
that every other mod (e.g. Flower's ``LocalDpMod``) and the user's own train function see ordinary
plaintext arrays, and nothing decrypted leaves the site except through secagg's release path.

Inbound (train, evaluate, query messages carrying secagg's terms): the encrypted global model is
checked and decrypted exactly like ``secagg fetch`` does (:func:`secagg.api.open_served`: every
contributor's record, the minimum cohort, every ciphertext's count and integrity slots, rounding to
the release grid), then handed on as the usual ``"arrays"`` ArrayRecord. A check that fails raises,
so the user's code never runs and Flower replies with an error.

Outbound (train replies): the reply's one ArrayRecord is flattened in the round's order, clipped and
noised with the round's DP (or the site's local DP), encrypted under the site's key and sealed with
the round's contribution record; the reply then carries one packed Array of ciphertexts instead.
The sample weight (``"num-examples"`` in the reply's metrics) is taken out of the metrics: it
travels only inside the ciphertext. Messages without secagg's terms pass through untouched.

Flower already has a ``flwr.client.mod.secagg_mod`` (its SecAgg protocol); this one is
``secagg.flower.secagg_mod`` (an instance of :class:`SecAggMod`).
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from secagg.errors import AggregateCheckError, KeyFileError, MaskingError, ModelFormatError, RoundStateError
from secagg.flower import wire
from secagg.keys import ClientKey, load_client_key
from secagg.packing import ModelSpec
from secagg.privacy.mechanism import DPConfig
from secagg.rounds import DEFAULT_MIN_COHORT, RoundStatus
from secagg.site_policy import SitePolicy
from secagg.submission import plaintext_update
from secagg.updates import encrypt_update, seal_ciphertexts

log = logging.getLogger("secagg.flower")
#: The node config entry (``flower-supernode --node-config 'secagg-key="/path/client.key"'``) naming the site's key.
KEY_CONFIG = "secagg-key"
#: The ClientApp's context state entry recording that this site has opened an encrypted global model.
_STATE = "secagg.mod"
_keys: dict[str, ClientKey] = {}
_keys_lock = threading.Lock()


def client_id(ctxt: Context) -> str:
    """The secagg client id of a SuperNode: ``node-<node id>`` (the strategy binds it to the reply's sender)."""
    return f"node-{ctxt.node_id}"


class SecAggMod:
    """secagg's encryption around a Flower ClientApp (see the module docstring).

    ``key``: the site's ``client.key`` (a path or a loaded key). Without it the path comes from the
    SuperNode's node config ``secagg-key``; in Flower's simulation engine, whose nodes have no node
    config of their own, from the run config ``secagg-key``. The key never travels.
    ``min_cohort``: this site's own minimum number of contributors to any sum it decrypts.
    ``weight_key``: the reply metric holding the sample weight (Flower's FedAvg convention).
    ``local_dp``: local DP of this site's own in rounds without DP settings; ``policy``: this
    site's DP rules (:class:`secagg.site_policy.SitePolicy`), checked against every round.
    """

    def __init__(self, key: str | os.PathLike | ClientKey | None = None, *, min_cohort: int = DEFAULT_MIN_COHORT,
                 weight_key: str = "num-examples", local_dp: DPConfig | None = None,
                 policy: SitePolicy | None = None, rng: np.random.Generator | None = None) -> None:
        self.key = key
        self.min_cohort = min_cohort
        self.weight_key = weight_key
        self.local_dp = local_dp
        self.policy = policy
        self.rng = rng

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if not msg.has_content() or wire.TERMS not in msg.content.config_records:
            return call_next(msg, ctxt)
        key = self._key(ctxt)
        content = msg.content
        status, spec = _round(content, key, "round-status")
        train = msg.metadata.message_type.split(".")[0] == MessageType.TRAIN
        if train:
            self._check_round(status, key)  # before the site spends time training for a round it must refuse
        global_arrays = self._open_global(content, key, spec, ctxt)
        # The user's code sees Flower's usual message: "arrays" (plaintext) and "config".
        for name in (wire.TERMS, wire.GLOBAL):
            if name in content:
                del content[name]
        content["arrays"] = global_arrays
        reply = call_next(msg, ctxt)
        if not train or reply.has_error():
            return reply
        return self._encrypt_reply(reply, ctxt, key, status, spec, global_arrays)

    def _check_round(self, status: RoundStatus, key: ClientKey) -> None:
        if status.state != "collecting":
            raise RoundStateError(f"round {status.round_id!r} is {status.state}; it accepts no more updates")
        if status.masking:
            raise MaskingError("masked rounds do not run over Flower yet; use secagg's own transport for masking")
        if self.policy is not None:
            self.policy.check(status, key.key_id, local_dp=self.local_dp)

    # -- inbound ----------------------------------------------------------------------------------

    def _open_global(self, content: RecordDict, key: ClientKey, spec: ModelSpec, ctxt: Context) -> ArrayRecord:
        """The global model in plaintext: decrypted from the encrypted sum, or the ServerApp's initial arrays."""
        plain = content.array_records.get("arrays", ArrayRecord())
        if wire.GLOBAL not in content.array_records:
            if _STATE in ctxt.state.config_records:
                # Once a site has opened an encrypted global model in this run, a plaintext one can only
                # come from a ServerApp that deviates from the protocol (a model of its own choosing).
                raise AggregateCheckError("the ServerApp sent a plaintext model after this site had opened an "
                                          "encrypted global model in this run; refused")
            return plain  # round 1: the initial model, which every site needs in common and which is public
        from secagg.api import open_served  # the client's half of secagg: needs TenSEAL

        gstatus, gspec = _round(content, key, "global-status")
        if not gspec.matches(spec):
            raise ModelFormatError("the encrypted global model is of another architecture than the round's model")
        packed = content.array_records[wire.GLOBAL].get("sum")
        head, chunks = wire.read_aggregate(packed)
        average = open_served(key, gstatus, gspec, head, chunks, min_cohort=self.min_cohort)
        log.info("decrypted the global model of round %s: %d contributions", gstatus.round_id, average.contributions)
        ctxt.state[_STATE] = ConfigRecord({"opened-round": gstatus.round_id})
        return wire.plain_record(gspec, average.vector, {k: a.numpy() for k, a in plain.items()})

    # -- outbound ---------------------------------------------------------------------------------

    def _encrypt_reply(self, reply: Message, ctxt: Context, key: ClientKey, status: RoundStatus, spec: ModelSpec,
                       global_arrays: ArrayRecord) -> Message:
        content = reply.content
        if len(content.array_records) != 1:
            raise ModelFormatError(f"the ClientApp's train reply holds {len(content.array_records)} ArrayRecords; "
                                   "secagg encrypts exactly one (the trained model)")
        (arrays_name, arrays), = content.array_records.items()
        metrics = dict(content.metric_records.get("metrics", MetricRecord()))
        weight = metrics.pop(self.weight_key, None)
        dp = status.dp or self.local_dp
        if dp:
            weight = 1.0  # DP rounds average with equal weights: one site's clipped update is the sensitivity
        elif not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise ModelFormatError(
                f"the ClientApp's train reply needs a positive sample weight in its metrics as {self.weight_key!r} "
                f"(got {weight!r}); secagg encrypts it with the model")
        tensors = {k: a.numpy() for k, a in arrays.items()}
        reference = {k: a.numpy() for k, a in global_arrays.items()} if len(global_arrays) else None
        plaintext = plaintext_update(key.key_id, status, spec, tensors, float(weight), dp_reference=reference,
                                     local_dp=self.local_dp, rng=self.rng, policy=self.policy)
        cts = encrypt_update(key, status, plaintext.theta, plaintext.weight)
        sealed = seal_ciphertexts(key, status, client_id(ctxt), cts)
        if self.policy is not None:
            self.policy.record(status, key.key_id, local_dp=self.local_dp, update=plaintext.digest)
        out = RecordDict({wire.UPDATE: ArrayRecord({"update": wire.pack_update(sealed.header, sealed.chunks)})})
        for name, record in content.items():
            if name != arrays_name and name != "metrics":
                out[name] = record
        if metrics:
            out["metrics"] = MetricRecord(metrics)
        reply.content = out
        log.info("encrypted the update for round %s: %d parameters, %d bytes", status.round_id, spec.num_params,
                 sealed.wire_bytes)
        return reply

    def _key(self, ctxt: Context) -> ClientKey:
        if isinstance(self.key, ClientKey):
            return self.key
        path = self.key or ctxt.node_config.get(KEY_CONFIG) or ctxt.run_config.get(KEY_CONFIG)
        if not path:
            raise KeyFileError(
                "secagg_mod needs this site's client.key: start the SuperNode with "
                f"--node-config '{KEY_CONFIG}=\"/path/to/client.key\"' (in simulation: the run config {KEY_CONFIG}), "
                "or give SecAggMod(key=...)")
        path = os.fspath(path)
        with _keys_lock:  # loading a TenSEAL context takes a while: once per process
            if path not in _keys:
                _keys[path] = load_client_key(path)
            return _keys[path]


def _round(content: RecordDict, key: ClientKey, field: str) -> tuple[RoundStatus, ModelSpec]:
    status, spec = wire.read_status(content.config_records[wire.TERMS], field)
    if status.key_id != key.key_id:
        raise KeyFileError(f"round {status.round_id!r} uses key {status.key_id} but this site holds {key.key_id}; "
                           "give the client.key from the same 'secagg keygen' as the ServerApp's server.key")
    return status, spec


#: The mod with its defaults: the key path from the node config (``secagg-key``).
secagg_mod = SecAggMod()
