"""Validate rendered Kubernetes manifests, offline and strictly.

    python k8s/validate.py [--kubernetes-version V ...] FILE.yaml [...]

Built-in kinds are checked by kubernetes-validate against Kubernetes' own
OpenAPI schemas in strict mode (an unknown field is an error), for every
version given. Custom resources (KEDA's ScaledObject and
TriggerAuthentication, the Prometheus Operator's ServiceMonitor, the RabbitMQ
cluster operator's RabbitmqCluster) are checked against the JSON Schemas in
k8s/schemas/, named <group>-<version>-<Kind>.json.
A kind with no schema anywhere is an error, never a silent pass.

Exit 0 when every document of every file passes; 1 with one line per
problem otherwise.
"""

import argparse
import json
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

SCHEMAS = pathlib.Path(__file__).resolve().parent / "schemas"
DEFAULT_VERSIONS = ["1.29.0", "1.37.0"]


def custom_schema(api_version: str, kind: str):
    """The repository's schema of a custom resource, or None."""
    path = SCHEMAS / f"{api_version.replace('/', '-')}-{kind}.json"
    if not path.exists():
        return None
    schema = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def problems(doc: dict, versions: list[str]) -> list[str]:
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    schema = custom_schema(api, kind)
    if schema is not None:
        validator = jsonschema.Draft202012Validator(schema)
        return [
            f"{kind} ({api}): at /{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        ]
    out = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            out.append(f"{kind} ({api}) against Kubernetes {version}: at /{path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            out.append(f"{kind} ({api}): neither Kubernetes {version} nor {SCHEMAS} has a schema for it")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", "-k", action="append", dest="versions")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    versions = args.versions or DEFAULT_VERSIONS
    failed = 0
    for name in args.files:
        docs = [d for d in yaml.safe_load_all(pathlib.Path(name).read_text()) if d]
        if not docs:
            print(f"{name}: no documents", file=sys.stderr)
            failed += 1
        for doc in docs:
            what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            found = problems(doc, versions)
            for p in found:
                print(f"{name}: {what}: {p}", file=sys.stderr)
            failed += len(found)
            if not found:
                print(f"{name}: {what}: ok")
    if failed:
        print(f"{failed} problem(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
