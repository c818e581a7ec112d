"""Derive rabbitmq.com-v1beta1-RabbitmqCluster.json from the RabbitMQ cluster
operator's CRD, for k8s/validate.py. Run by hand when moving to another
operator release (k8s/check never runs it and never downloads anything):

    git clone --depth 1 --branch v2.22.3 https://github.com/rabbitmq/cluster-operator /tmp/rmq
    target/k8s-venv/bin/python k8s/schemas/derive-rabbitmqcluster.py \
        /tmp/rmq/config/crd/bases/rabbitmq.com_rabbitmqclusters.yaml v2.22.3 \
        k8s/schemas/rabbitmq.com-v1beta1-RabbitmqCluster.json

The JSON Schema's $comment says what is kept, dropped and made stricter.
"""
import json
import sys

import yaml

crd = yaml.safe_load(open(sys.argv[1]))
tag = sys.argv[2]
(version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
root = version["schema"]["openAPIV3Schema"]

DROP = {"description", "default", "format", "example"}

def convert(n):
    if isinstance(n, list):
        return [convert(x) for x in n]
    if not isinstance(n, dict):
        return n
    out = {}
    for k, v in n.items():
        if k in DROP or k.startswith("x-kubernetes-"):
            continue
        if k == "properties":
            out[k] = {name: convert(p) for name, p in v.items()}
        elif k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"):
            out[k] = convert(v)
        else:
            out[k] = v
    if n.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
    elif "properties" in out and "additionalProperties" not in out:
        # The API server prunes (or, with strict field validation, rejects)
        # fields its structural schema does not list: here they are errors.
        out["additionalProperties"] = False
    if n.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        out.pop("type", None)
    if n.get("nullable"):
        out.pop("nullable", None)
        if "type" in out:
            out["type"] = [out["type"], "null"]
    for rule in n.get("x-kubernetes-validations", []):
        # The one CEL rule (spec.rabbitmq.envConfig) as JSON Schema.
        if rule["rule"] == "!self.contains('$(') && !self.contains('`')":
            out["not"] = {"pattern": "\\$\\(|`"}
        else:
            raise SystemExit(f"a CEL rule this script cannot translate: {rule['rule']}")
    return out

spec = convert(root["properties"]["spec"])
# spec.override: statefulSet/service > spec > template > spec > containers'
# fields.
OVERRIDE_DEPTH = 6

def shallow(n, depth):
    """n down to depth levels of named fields; below that, only the JSON type."""
    out = {k: v for k, v in n.items() if k in ("type", "anyOf", "enum")}
    if depth == 0:
        return out
    if "properties" in n:
        out["properties"] = {k: shallow(v, depth - 1) for k, v in n["properties"].items()}
        out["additionalProperties"] = n.get("additionalProperties", False)
    elif isinstance(n.get("additionalProperties"), dict):
        out["additionalProperties"] = shallow(n["additionalProperties"], depth - 1)
    if "items" in n:
        out["items"] = shallow(n["items"], depth)
    if "required" in n:
        out["required"] = n["required"]
    return out

spec["properties"]["override"] = shallow(spec["properties"]["override"], OVERRIDE_DEPTH)
metadata = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
schema = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$comment": (
        "Derived for tidemark from the RabbitMQ cluster operator's CRD "
        f"(github.com/rabbitmq/cluster-operator {tag}, config/crd/bases/rabbitmq.com_rabbitmqclusters.yaml, "
        "its v1beta1 openAPIV3Schema): descriptions, defaults, formats and x-kubernetes-* markers dropped, "
        "int-or-string kept as anyOf, the CEL rule on spec.rabbitmq.envConfig written as a pattern, "
        "status left out (the operator writes it, a manifest must not); spec.override (a partial StatefulSet and "
        "Service, 270 kB of the CRD's schema) is kept down to the fields of each container and of the Service's spec, "
        "with only JSON types below that. Stricter than the CRD: every object "
        "that lists its fields is closed (additionalProperties: false), so an unknown or misspelled field is "
        "an error rather than silently pruned, and the name is a DNS label (the operator derives Service and "
        "StatefulSet names from it). Used by k8s/validate.py."
    ),
    "title": "rabbitmq.com/v1beta1 RabbitmqCluster",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "rabbitmq.com/v1beta1"},
        "kind": {"const": "RabbitmqCluster"},
        "metadata": metadata,
        "spec": spec,
    },
}
json.dump(schema, open(sys.argv[3], "w"), indent=2)
open(sys.argv[3], "a").write("\n")
