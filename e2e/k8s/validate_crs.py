#!/usr/bin/env python3
"""Validates custom resources against the CRD schemas vendored in e2e/k8s/crds/, strictly.

kubernetes-validate knows only the built-in kinds. An apiserver with strict field validation
rejects a custom resource with an unknown field or a wrong type; this does the same offline:
every object schema that lists properties and neither allows additional properties nor
preserves unknown fields is closed (additionalProperties: false), as a structural schema prunes.

  validate_crs.py CRD_DIR FILE...     exit 0 when every custom resource in FILE... is valid

Documents whose kind has no CRD here are skipped (built-in kinds go to kubernetes-validate);
a document of a known group whose version or kind is missing fails.
"""
import copy
import glob
import os
import sys

import jsonschema
import yaml

# metadata as a user writes it; the apiserver rejects unknown metadata fields as well.
METADATA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}


def close(schema):
    """Closes every object schema that names its properties (see the module doc)."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            close(value)
    elif isinstance(schema, list):
        for value in schema:
            close(value)
    return schema


def load_crds(crd_dir):
    schemas, groups = {}, set()
    for path in sorted(glob.glob(os.path.join(crd_dir, "*.yaml"))):
        with open(path) as f:
            for crd in yaml.safe_load_all(f):
                if not crd:
                    continue
                group = crd["spec"]["group"]
                kind = crd["spec"]["names"]["kind"]
                groups.add(group)
                for version in crd["spec"]["versions"]:
                    schema = close(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                    schema["properties"]["metadata"] = METADATA
                    schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas, groups


def validate(doc, schemas, where):
    """Returns the list of errors of one custom resource (and the DataVolumes it embeds)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    schema = schemas[key]
    errors = [
        f"{where}: {key[1]} {doc.get('metadata', {}).get('name', '?')}: "
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]
    # KubeVirt's webhook checks a VirtualMachine's dataVolumeTemplates as DataVolumes.
    if key[1] == "VirtualMachine":
        for i, dvt in enumerate(doc.get("spec", {}).get("dataVolumeTemplates", []) or []):
            dv = dict(dvt)
            dv.setdefault("apiVersion", "cdi.kubevirt.io/v1beta1")
            dv.setdefault("kind", "DataVolume")
            errors += validate(dv, schemas, f"{where}: dataVolumeTemplates[{i}]")
    return errors


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    schemas, groups = load_crds(argv[1])
    errors, checked = [], 0
    for path in argv[2:]:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            api = str(doc.get("apiVersion", ""))
            key = (api, doc.get("kind"))
            if key in schemas:
                errors += validate(doc, schemas, path)
                checked += 1
            elif api.split("/")[0] in groups:
                errors.append(f"{path}: no vendored schema for {key[1]} {api}")
    for e in errors:
        print(f"ERROR {e}")
    print(f"custom resources: {checked} checked, {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
