"""Shared pieces of the deployment tests: the server's flags and defaults from
`blockserve serve --help`, a Dockerfile reader, .dockerignore matching and
YAML loading."""

import json
import os
import re
import shlex
import subprocess

import yaml


# ------------------------------------------------------------------ the server

def serve_help(blockserve):
    """{flag: default or None} from `blockserve serve --help`, e.g.
    {"--grpc-port": "8001", "--model-repository": None, ...}."""
    out = subprocess.run([blockserve, "serve", "--help"], capture_output=True, text=True,
                         timeout=30)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError("blockserve serve --help failed (%d): %s" % (out.returncode, text))
    helps = {}  # flag: its help, continuation lines joined
    flag = None
    for line in text.splitlines():
        m = re.match(r"\s*(--[a-z0-9][a-z0-9-]*)\b(.*)", line)
        if m:
            flag = m.group(1)
            helps[flag] = m.group(2)
        elif flag is not None and line.startswith(" "):
            helps[flag] += " " + line.strip()
        else:
            flag = None
    flags = {}
    for f, h in helps.items():
        d = re.search(r"\(default:?\s+([^;),\s]+)", h)
        flags[f] = d.group(1) if d else None
    if not flags:
        raise RuntimeError("blockserve serve --help lists no flags:\n" + text)
    return flags


def flags_in(argv):
    """The --flags of an argument list (both --flag value and --flag=value)."""
    return [a.split("=", 1)[0] for a in argv if isinstance(a, str) and a.startswith("--")]


def flag_value(argv, flag):
    """The value given to flag in argv, or None."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if isinstance(a, str) and a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


# ------------------------------------------------------------------ Dockerfile

class Instruction:
    def __init__(self, stage, keyword, rest, line):
        self.stage = stage      # index of its FROM stage, -1 before the first FROM
        self.keyword = keyword  # upper case: FROM, RUN, COPY, ...
        self.rest = rest        # the text after the keyword, continuations joined
        self.line = line        # 1-based line of the keyword

    def exec_form(self):
        """The JSON (exec form) argument list, or None for the shell form."""
        body = self.rest
        if self.keyword == "HEALTHCHECK":
            m = re.search(r"\bCMD\s+(.*)$", body, re.S)
            body = m.group(1) if m else ""
        body = body.strip()
        if body.startswith("["):
            return json.loads(body)
        return None

    def options(self):
        """--name=value options before the arguments (COPY --from=..., HEALTHCHECK --interval=...)."""
        return dict(re.findall(r"--([a-z-]+)=(\S+)", self.rest.split(" CMD ")[0]
                               if self.keyword == "HEALTHCHECK" else self.rest))

    def words(self):
        """The shell-split arguments without leading --options."""
        w = shlex.split(self.rest)
        while w and w[0].startswith("--"):
            w.pop(0)
        return w


class Dockerfile:
    def __init__(self, path):
        self.path = path
        self.instructions = []
        self.stages = []  # [(name or None, image)]
        with open(path) as f:
            lines = f.read().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            start = i + 1
            i += 1
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            text = line
            while text.rstrip().endswith("\\") and i < len(lines):
                text = text.rstrip()[:-1] + " "
                nxt = lines[i]
                i += 1
                if nxt.lstrip().startswith("#"):
                    continue  # comment lines inside a continuation are dropped
                text += nxt.strip()
            keyword, _, rest = text.strip().partition(" ")
            keyword = keyword.upper()
            if keyword == "FROM":
                w = rest.split()
                w = [x for x in w if not x.startswith("--")]
                name = w[2] if len(w) >= 3 and w[1].upper() == "AS" else None
                self.stages.append((name, w[0]))
            self.instructions.append(Instruction(len(self.stages) - 1, keyword, rest.strip(), start))

    def stage_index(self, name):
        for i, (n, _) in enumerate(self.stages):
            if n == name:
                return i
        return None

    def of_stage(self, stage, keyword=None):
        return [x for x in self.instructions
                if x.stage == stage and (keyword is None or x.keyword == keyword)]

    def arg_defaults(self, stage):
        """ARG defaults visible in a stage (global ARGs are not: they only serve FROM)."""
        out = {}
        for x in self.of_stage(stage, "ARG"):
            name, eq, val = x.rest.partition("=")
            if eq:  # an ARG without a default stays unset
                out[name.strip()] = val.strip().strip('"')
        return out

    def last(self, stage, keyword):
        found = self.of_stage(stage, keyword)
        return found[-1] if found else None


# ------------------------------------------------------------- .dockerignore

def _glob_to_re(pattern):
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    """Docker's .dockerignore rules: patterns relative to the context root,
    matched against a path or any of its parent directories; later lines win;
    `!` re-includes."""

    def __init__(self, path):
        self.rules = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    neg = line.startswith("!")
                    pat = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
                    self.rules.append((neg, _glob_to_re(pat)))

    def excluded(self, relpath):
        parts = relpath.strip("/").split("/")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        result = False
        for neg, rx in self.rules:
            if any(rx.match(p) for p in prefixes):
                result = not neg
        return result


def context_files(root, ignore):
    """Relative paths of the files docker build would send as the context."""
    out = []
    for d, dirs, files in os.walk(root):
        rel_d = os.path.relpath(d, root)
        rel_d = "" if rel_d == "." else rel_d + "/"
        dirs[:] = [x for x in dirs if not ignore.excluded(rel_d + x) or
                   any(neg for neg, _ in ignore.rules)]
        for f in files:
            rel = rel_d + f
            if not ignore.excluded(rel):
                out.append(rel)
    return sorted(out)


# ------------------------------------------------------------------------ YAML

def load_docs(path):
    """Every document of a YAML file (empty documents dropped)."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def port_of(spec):
    """The container side of a compose port mapping ("8001:8001", "127.0.0.1:8001:8001/tcp", 8001)."""
    if isinstance(spec, dict):
        return int(spec["target"])
    s = str(spec).split("/")[0]
    return int(s.rsplit(":", 1)[-1])
