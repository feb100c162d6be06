#!/usr/bin/env python3
"""Offline checks of the Dockerfile, since CI has no Docker engine to build it.

  check_dockerfile.py [REPO]    exit 0 when all checks pass; prints one line per check

- every COPY source (outside --from stages) exists and is not excluded by .dockerignore;
- every workspace member of Cargo.toml is copied, so `cargo build --locked` sees the workspace;
- every repository script a RUN names exists and is executable, and the builder runs
  e2e/k8s/build-release.sh, which runs e2e/setup.sh (what .ci/run runs) and
  `cargo build --release --locked`;
- the builder's Rust is at least the workspace's rust-version;
- the runtime stage installs the tools the node plugin runs, and librados2 for rados builds.
"""
import fnmatch
import os
import re
import shlex
import sys
import tomllib


def instructions(text):
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if not cur and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip():
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def ignored(path, patterns):
    path = path.rstrip("/")
    for pat in patterns:
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or pat.startswith(path + "/"):
            return pat
    return None


def version(v):
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def main(repo):
    failures, passes = [], []

    def check(ok, what):
        (passes if ok else failures).append(what)
        print(f"{'ok  ' if ok else 'FAIL'} {what}")

    dockerfile = open(os.path.join(repo, "Dockerfile")).read()
    ignore_path = os.path.join(repo, ".dockerignore")
    patterns = [
        p.strip() for p in open(ignore_path).read().splitlines() if p.strip() and not p.startswith("#")
    ] if os.path.exists(ignore_path) else []
    steps = instructions(dockerfile)
    copied = set()
    runs = []
    stage = -1
    stages = []
    for word, rest in steps:
        if word == "FROM":
            stage += 1
            stages.append(rest)
        elif word == "COPY":
            args = shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue
            args = [a for a in args if not a.startswith("--")]
            for src in args[:-1]:
                exists = os.path.exists(os.path.join(repo, src))
                check(exists, f"COPY source {src} exists")
                pat = ignored(src, patterns)
                check(pat is None, f"COPY source {src} is not excluded by .dockerignore" + (f" ({pat})" if pat else ""))
                copied.add(src.rstrip("/"))
        elif word == "RUN":
            runs.append((stage, rest))

    cargo = tomllib.load(open(os.path.join(repo, "Cargo.toml"), "rb"))
    for member in cargo["workspace"]["members"]:
        check(member in copied, f"workspace member {member} is copied")
    for need in ("Cargo.toml", "Cargo.lock", "src"):
        check(need in copied, f"{need} is copied")

    for _, cmd in runs:
        for script in re.findall(r"(?:^|[\s;&|])((?:e2e|scripts)/[\w./-]+\.sh)", cmd):
            path = os.path.join(repo, script)
            check(os.access(path, os.X_OK), f"RUN script {script} exists and is executable")
            check(script in copied, f"RUN script {script} is copied into the build")
    builder_runs = " ".join(cmd for st, cmd in runs if st == 0)
    check("e2e/k8s/build-release.sh" in builder_runs, "the builder runs e2e/k8s/build-release.sh")
    build = open(os.path.join(repo, "e2e/k8s/build-release.sh")).read()
    check("e2e/setup.sh" in build, "build-release.sh runs e2e/setup.sh (as .ci/run does)")
    check("cargo build --release --locked" in build, "build-release.sh runs cargo build --release --locked")
    ci = open(os.path.join(repo, ".ci/run")).read()
    check("e2e/setup.sh" in ci, ".ci/run runs e2e/setup.sh too")

    m = re.match(r"rust:(\d+\.\d+)", stages[0] if stages else "")
    want = cargo["workspace"]["package"]["rust-version"]
    check(bool(m) and version(m.group(1)) >= version(want), f"builder Rust {m.group(1) if m else '?'} >= rust-version {want}")
    check(len(stages) >= 2 and stages[-1].startswith("debian:bookworm-slim"), "runtime stage is debian:bookworm-slim")
    runtime = " ".join(cmd for st, cmd in runs if st == len(stages) - 1)
    for pkg in ("e2fsprogs", "xfsprogs", "util-linux", "kmod"):
        check(pkg in runtime, f"runtime installs {pkg}")
    check("rados" in runtime and "librados2" in runtime, "runtime installs librados2 for rados builds")
    for pat in ("target", ".git"):
        check(any(p.rstrip("/") == pat for p in patterns), f".dockerignore excludes {pat}/")
    print(f"dockerfile: {len(passes)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
