#!/usr/bin/env python3
"""Lists the imports between the modules of each workspace crate and finds import loops.

Usage: scripts/module-deps.py [--list [PREFIX]] [CRATE_DIR ...]

For every crate (a directory with src/lib.rs or src/main.rs; default: every workspace
member), each module (a file, or an inline `mod name { ... }` such as `mod tests`) gets
an edge to every module it names through `crate::...` or `super::...` (in `use` lines or
inline paths, comments left out). A path is resolved to the longest module prefix; an
item of a module counts as that module. `mod child;` declarations are containment, not
imports, and are not edges. Then it prints, per crate, the strongly connected components
with more than one module: each is an import loop. Exit status 1 when any loop is found.

With --list, it also prints each module's imports (only modules under PREFIX, e.g.
`providers::mqtt`), the per-folder import list the issue asks for.
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def members():
    text = open(os.path.join(ROOT, "Cargo.toml")).read()
    m = re.search(r"^members\s*=\s*\[(.*?)\]", text, re.M | re.S)
    return re.findall(r'"([^"]+)"', m.group(1)) if m else []


def strip_comments(src):
    """Removes // comments and string literals (kept as empty strings), so paths in docs
    and messages do not count."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif c == "r" and re.match(r'r#*"', src[i:i + 10]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', src[i:]).group(1)
            end = '"' + hashes
            j = src.find(end, i + 2 + len(hashes))
            out.append('""')
            i = n if j < 0 else j + len(end)
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", src[i:i + 4]):
            m = re.match(r"'(\\.|[^\\'])'", src[i:])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def file_modules(crate_dir):
    """Maps module path (tuple) -> file, following `mod x;` from the crate roots."""
    src = os.path.join(crate_dir, "src")
    roots = [f for f in ("lib.rs", "main.rs") if os.path.exists(os.path.join(src, f))]
    mods = {}

    def visit(path, file, dir_for_children):
        mods[path] = file
        text = strip_comments(open(file).read())
        for m in re.finditer(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", text, re.M):
            name = m.group(1)
            for cand in (os.path.join(dir_for_children, name + ".rs"),
                         os.path.join(dir_for_children, name, "mod.rs")):
                if os.path.exists(cand):
                    child_dir = (os.path.dirname(cand) if cand.endswith("mod.rs")
                                 else os.path.join(dir_for_children, name))
                    visit(path + (name,), cand, child_dir)
                    break

    for r in roots[:1]:
        visit((), os.path.join(src, r), src)
    return mods


def split_inline(text):
    """Splits a file's text into (relative module path, text) for inline modules."""
    parts = {(): []}
    stack = [((), 0)]  # (path, depth at which it closes)
    depth = 0
    i = 0
    pending = None
    for m in re.finditer(r"\bmod\s+(\w+)\s*\{|[{}]|(?:(?!\bmod\s+\w+\s*\{)[^{}])+", text):
        tok = m.group(0)
        cur = stack[-1][0]
        if m.group(1):
            depth += 1
            path = cur + (m.group(1),)
            parts.setdefault(path, [])
            stack.append((path, depth))
        elif tok == "{":
            depth += 1
            parts[cur].append(tok)
        elif tok == "}":
            if len(stack) > 1 and stack[-1][1] == depth:
                stack.pop()
            else:
                parts[cur].append(tok)
            depth -= 1
        else:
            parts[cur].append(tok)
    return {p: "".join(t) for p, t in parts.items()}


def use_paths(text):
    """Every `crate::...`/`super::...`/`self::...` path, group imports expanded."""
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        paths.extend(expand(m.group(1).replace("\n", " ")))
    rest = re.sub(r"\buse\s+[^;]+;", " ", text)
    for m in re.finditer(r"(?<![\w:])((?:crate|super|self)(?:::\w+)+)", rest):
        paths.append(m.group(1))
    return [p for p in paths if p.split("::")[0] in ("crate", "super", "self")]


def expand(tree):
    tree = re.sub(r"\s+", "", tree)
    m = re.match(r"^(.*?)::\{(.*)\}$", tree)
    if not m:
        return [re.sub(r"\bas\w+$", "", tree)]
    prefix, inner = m.group(1), m.group(2)
    out, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    if cur:
        out.append(cur)
    res = []
    for part in out:
        if part == "self":
            res.append(prefix)
        else:
            res.extend(expand(prefix + "::" + part))
    return res


def resolve(path, here, modules):
    segs = path.split("::")
    if segs[0] == "crate":
        base, segs = (), segs[1:]
    else:
        base = here
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
    target = base
    for s in segs:
        if target + (s,) in modules:
            target = target + (s,)
        else:
            break
    return target


def sccs(nodes, edges):
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    for v in sorted(nodes):
        if v not in index:
            strong(v)
    return [c for c in out if len(c) > 1]


def analyse(crate_dir, list_prefix):
    name = os.path.basename(crate_dir.rstrip("/"))
    files = file_modules(crate_dir)
    modules = set()
    texts = {}
    for path, file in files.items():
        text = strip_comments(open(file).read())
        for rel, body in split_inline(text).items():
            modules.add(path + rel)
            texts[path + rel] = body
    edges = {}
    for mod, body in texts.items():
        for p in use_paths(body):
            t = resolve(p, mod, modules)
            if t != mod:
                edges.setdefault(mod, set()).add(t)
    fmt = lambda m: "::".join((name,) + m) if m else name + " (root)"
    if list_prefix is not None:
        for mod in sorted(modules):
            label = fmt(mod)
            if label.startswith(list_prefix):
                deps = ", ".join(sorted(fmt(t) for t in edges.get(mod, ()))) or "-"
                print(f"  {label} -> {deps}")
    loops = sccs(modules, edges)
    n_edges = sum(len(v) for v in edges.values())
    if loops:
        print(f"{name}: {len(modules)} modules, {n_edges} imports, {len(loops)} import loop(s):")
        for comp in loops:
            print("  loop: " + " <-> ".join(sorted(fmt(m) for m in comp)))
    else:
        print(f"{name}: {len(modules)} modules, {n_edges} imports, no import loop (a DAG)")
    return len(loops)


def main():
    args = sys.argv[1:]
    list_prefix = None
    if args and args[0] == "--list":
        args = args[1:]
        list_prefix = ""
        if args and not os.path.isdir(os.path.join(ROOT, args[0])):
            list_prefix = args[0]
            args = args[1:]
    crates = args or members()
    total = sum(analyse(os.path.join(ROOT, c), list_prefix) for c in crates)
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
