#!/usr/bin/env python3
"""The file-level import graph of the workspace's crates, and its cycles: an edge A -> B when file A names an item of
module B in a `use` or a path (crate::x, super::x, self::x, a child module by name), tests left out. Prints every
cycle and exits non-zero if there is one. Usage: .ci/import-cycles.py common/src worker/src coordinator/src tests/src"""
import os, re, sys

def module_files(src):
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith('.rs'): continue
            p = os.path.join(root, f)
            rel = os.path.relpath(p, src)[:-3].split(os.sep)
            if rel[-1] in ('mod',): rel = rel[:-1]
            if rel == ['lib'] or rel == ['main']: rel = []
            mods[tuple(rel)] = p
    return mods

def strip(text):
    text = re.sub(r'//[^\n]*', '', text)
    text = re.sub(r'/\*.*?\*/', '', text, flags=re.S)
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    return text

def paths_in(text):
    # use trees: expand braces roughly
    out = []
    for m in re.finditer(r'\buse\s+([^;]+);', text):
        out.extend(expand(m.group(1).replace('\n', ' ')))
    for m in re.finditer(r'\b((?:crate|super|self)(?:::\w+)+)', text):
        out.append(m.group(1).split('::'))
    return out

def expand(tree):
    tree = tree.strip()
    i = tree.find('{')
    if i < 0:
        return [[s.strip() for s in tree.split(' as ')[0].split('::') if s.strip()]]
    prefix = [s for s in tree[:i].split('::') if s.strip()]
    inner = tree[i+1:tree.rfind('}')]
    parts, depth, cur = [], 0, ''
    for c in inner:
        if c == ',' and depth == 0:
            parts.append(cur); cur = ''
        else:
            depth += c == '{'; depth -= c == '}'; cur += c
    parts.append(cur)
    res = []
    for p in parts:
        if p.strip():
            for e in expand(p):
                res.append(prefix + e)
    return res

def resolve(mod, path, mods):
    if not path: return None
    if path[0] == 'crate': base, rest = (), path[1:]
    elif path[0] == 'super':
        base, rest = mod, path
        while rest and rest[0] == 'super':
            base, rest = base[:-1], rest[1:]
    elif path[0] == 'self': base, rest = mod, path[1:]
    else:
        # a child module named directly
        if mod + (path[0],) in mods: base, rest = mod, path
        else: return None
    cur = tuple(base)
    for seg in rest:
        if cur + (seg,) in mods: cur = cur + (seg,)
        else: break
    return cur

def main(crates):
    cycles_found = 0
    for src in crates:
        mods = module_files(src)
        graph = {m: set() for m in mods}
        for m, p in mods.items():
            text = strip(open(p).read())
            # drop #[cfg(test)] mod tests { ... } blocks at the end (tests may import anything)
            k = text.find('#[cfg(test)]\nmod tests {')
            if k >= 0: text = text[:k]
            for path in paths_in(text):
                t = resolve(m, path, mods)
                if t is not None and t != m and t in mods:
                    graph[m].add(t)
        # Tarjan SCC
        index, low, stack, on, sccs, n = {}, {}, [], set(), [], [0]
        sys.setrecursionlimit(10000)
        def sc(v):
            index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
            for w in graph[v]:
                if w not in index: sc(w); low[v] = min(low[v], low[w])
                elif w in on: low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)
                    if w == v: break
                if len(comp) > 1: sccs.append(comp)
        for v in graph:
            if v not in index: sc(v)
        for comp in sccs:
            cycles_found += 1
            names = ['::'.join(c) or '(root)' for c in comp]
            print(f"{src}: cycle among {sorted(names)}")
            for a in comp:
                for b in graph[a]:
                    if b in comp: print(f"    {'::'.join(a) or '(root)'} -> {'::'.join(b) or '(root)'}")
    print(f"{cycles_found} cycle(s)")
    return 1 if cycles_found else 0

sys.exit(main(sys.argv[1:]))
