"""A small mutation tester: standard operator mutations of chosen functions of one module, each
run against a few test files in this process (the mutated module is exec'd over the imported
one, so the tests see it, and other modules' `from MODULE import name` bindings of the mutated
functions and classes are pointed at the mutant's; the original namespace and bindings are put back
after each mutant). MODULE is a path from the repository root: model.py, lib/engine.py, ...

    python tests/mutation/mutate.py MODULE.py --scope NAME [NAME ...] --tests FILE [FILE ...]
                                    [-k EXPR] [--list] [--only N ...]

--scope names top-level functions or classes (a class: all its methods) whose code is mutated.
Mutations (those of mutmut's core, roughly): comparison operators (< <=, > >=, == !=, is / is not,
in / not in), arithmetic and bitwise operators (+ -, * /, / //, // /, % *, ** *, & |, ^ &, << >>),
augmented assignments, unary - ~ not removed, and/or swapped, numbers n -> n + 1 (0.0 -> 1.0,
floats x -> 2x), True/False swapped, None as a keyword argument -> 0, a call of a one-argument
elementwise function (tanh, sigmoid, relu, softmax, floor, ...) replaced by its argument, `break`
<-> `continue`. Strings are never mutated. A mutant that raises while being exec'd, or that makes
the tests fail, error or run past --timeout seconds, is killed; each kill is printed with its
reason (the first failing test, the timeout, or the load error). The unmutated run is made twice
(each mutant is one more pytest session in this process, so a test must pass again in it), and
--timeout must be at least twice its time (a timeout fires inside a test and can leave that test's
state to the next mutants).
"""
import argparse
import ast
import copy
import importlib
import inspect
import io
import os
import signal
import sys
import time
import contextlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
       ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
       ast.Mod: ast.Mult, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitAnd,
       ast.LShift: ast.RShift, ast.RShift: ast.LShift, ast.MatMult: ast.Mult}
MODULES = {'torch', 'F', 'np', 'math', 'nn', 'models', 'utils'}
ELEMENTWISE = {'tanh', 'sigmoid', 'relu', 'softmax', 'floor', 'ceil', 'round', 'abs', 'sqrt', 'exp', 'log',
               'l2norm', 'normalize', 'float', 'int', 'double', 'clamp', 'contiguous', 'flip', 'detach'}


def docstring_ids(tree):
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def mutations(node):
    """(description, apply(node) -> None) for each mutation of this one node."""
    out = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in CMP:
                new = CMP[type(op)]
                out.append((f'{type(op).__name__} -> {new.__name__}',
                            lambda n, i=i, new=new: n.ops.__setitem__(i, new())))
    elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BIN:
        new = BIN[type(node.op)]
        out.append((f'{type(node.op).__name__} -> {new.__name__}', lambda n, new=new: setattr(n, 'op', new())))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f'{type(node.op).__name__} -> {new.__name__}', lambda n, new=new: setattr(n, 'op', new())))
    elif isinstance(node, ast.Constant) and not isinstance(node.value, str):
        v = node.value
        if isinstance(v, bool):
            out.append((f'{v} -> {not v}', lambda n: setattr(n, 'value', not n.value)))
        elif isinstance(v, int):
            out.append((f'{v} -> {v + 1}', lambda n: setattr(n, 'value', n.value + 1)))
        elif isinstance(v, float):
            new = 1.0 if v == 0 else 2 * v
            out.append((f'{v} -> {new}', lambda n, new=new: setattr(n, 'value', new)))
    elif isinstance(node, ast.Break):
        out.append(('break -> continue', None))
    elif isinstance(node, ast.Continue):
        out.append(('continue -> break', None))
    return out


class Scoped(ast.NodeVisitor):
    """Collects (path to node, description) for every mutable node inside the scope."""

    def __init__(self, scope, skip):
        self.scope, self.skip, self.points = scope, skip, []

    def walk(self, tree):
        for top in tree.body:
            if isinstance(top, (ast.FunctionDef, ast.ClassDef)) and top.name in self.scope:
                self._visit(top)

    def _visit(self, node):
        for child in ast.walk(node):
            if id(child) in self.skip:
                continue
            if isinstance(child, ast.JoinedStr):        # f-strings: messages
                for part in ast.walk(child):
                    self.skip.add(id(part))
                continue
            for desc, _ in mutations(child):
                self.points.append((child, desc))
            if isinstance(child, ast.UnaryOp) and isinstance(child.op, (ast.USub, ast.Invert, ast.Not)):
                self.points.append((child, f'drop unary {type(child.op).__name__}'))
            if isinstance(child, ast.Call):
                func = child.func
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in MODULES:
                    if func.attr in ELEMENTWISE and child.args:
                        self.points.append((child, f'{func.attr}(x, ...) -> x'))
                elif isinstance(func, ast.Attribute):
                    if func.attr in ELEMENTWISE:
                        self.points.append((child, f'x.{func.attr}(...) -> x'))
                elif isinstance(func, ast.Name) and func.id in ELEMENTWISE and child.args:
                    self.points.append((child, f'{func.id}(x, ...) -> x'))
            if isinstance(child, ast.keyword) and isinstance(child.value, ast.Constant) and child.value.value is None:
                self.points.append((child, f'{child.arg}=None -> {child.arg}=0'))


class Replace(ast.NodeTransformer):
    def __init__(self, target, desc):
        self.target, self.desc = target, desc

    def generic_visit(self, node):
        node = super().generic_visit(node)
        if node is not self.target:
            return node
        d = self.desc
        if d.startswith('drop unary'):
            return node.operand
        if d.endswith('-> x') and d.startswith('x.'):
            return node.func.value
        if d.endswith('-> x'):
            return node.args[0]
        if d == 'break -> continue':
            return ast.copy_location(ast.Continue(), node)
        if d == 'continue -> break':
            return ast.copy_location(ast.Break(), node)
        if '=None ->' in d:
            node.value = ast.copy_location(ast.Constant(0), node.value)
            return node
        for desc, apply in mutations(node):
            if desc == d:
                apply(node)
                return node
        raise AssertionError(d)


class Timeout(Exception):
    pass


def on_alarm(signum, frame):
    raise Timeout()


def rebind(module, original):
    """Point the other modules' `from module import name` bindings of the mutated functions and
    classes at the mutant's; returns (module, name, original object) for each, for `restore`."""
    changed = {id(old): module.__dict__[name] for name, old in original.items()
               if (inspect.isfunction(old) or inspect.isclass(old)) and getattr(old, '__module__', None) == module.__name__
               and module.__dict__.get(name) is not old}
    out = []
    for other in list(sys.modules.values()):
        if other is None or other is module:
            continue
        space = getattr(other, '__dict__', None)
        if not isinstance(space, dict):
            continue
        for key, value in list(space.items()):
            if id(value) in changed and value is not None:
                out.append((space, key, value))
                space[key] = changed[id(value)]
    return out


def restore(module, original, rebound):
    """The module's namespace and the other modules' bindings exactly as before the mutant (the
    same objects, so isinstance and identity checks elsewhere keep working)."""
    module.__dict__.clear()
    module.__dict__.update(original)
    for space, key, value in rebound:
        space[key] = value


class FirstFailure:
    """A pytest plugin that keeps the id of the first test that failed or errored (a kill's reason)."""
    def __init__(self):
        self.nodeid = None

    def pytest_runtest_logreport(self, report):
        if report.failed and self.nodeid is None:
            self.nodeid = report.nodeid


def run_tests(args):
    """pytest's exit code (0: the tests pass) and the first failing test's id."""
    import pytest
    argv = ['-x', '-q', '-n', '0', '-p', 'no:cacheprovider', '-W', 'ignore'] + args.tests + (['-k', args.k] if args.k else [])
    first = FirstFailure()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return pytest.main(argv, plugins=[first]), first.nodeid


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('module')
    parser.add_argument('--scope', nargs='+', required=True)
    parser.add_argument('--tests', nargs='+', required=True)
    parser.add_argument('-k', default=None)
    parser.add_argument('--list', action='store_true')
    parser.add_argument('--only', nargs='*', type=int)
    parser.add_argument('--timeout', type=int, default=120)
    args = parser.parse_args()
    os.chdir(ROOT)
    path = os.path.join(ROOT, args.module)
    source = open(path).read()
    tree = ast.parse(source)
    finder = Scoped(set(args.scope), docstring_ids(tree))
    finder.walk(tree)
    missing = set(args.scope) - {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not missing, f'not in {args.module}: {missing}'
    points = finder.points
    lines = source.splitlines()
    if args.list:
        for i, (node, desc) in enumerate(points):
            print(f'{i:4d} {args.module}:{node.lineno}: {desc:24s} | {lines[node.lineno - 1].strip()[:90]}')
        print(f'{len(points)} mutants')
        return 0
    name = os.path.splitext(os.path.relpath(path, ROOT))[0].replace(os.sep, '.')    # lib/crop.py -> lib.crop
    module = importlib.import_module(name)
    original = dict(module.__dict__)
    signal.signal(signal.SIGALRM, on_alarm)
    started = time.monotonic()
    rc, failed = run_tests(args)
    if rc != 0:
        print(f'the tests fail on the unmutated module ({failed})')
        return 1
    baseline = time.monotonic() - started
    rc, failed = run_tests(args)
    if rc != 0:         # every mutant is one more session in this process: the tests must allow it
        print(f'the tests pass once but fail when run again in this process ({failed}): a test or its set-up '
              f'keeps state between sessions; fix that or leave it out with -k')
        return 1
    if args.timeout < 2 * baseline:
        # a timeout fires inside pytest, in the middle of a test: it would count a slow mutant killed
        # and can leave that test's state (signal handlers, patched modules) to the mutants after it
        print(f'--timeout {args.timeout} is under twice the unmutated run ({baseline:.0f} s): pass '
              f'--timeout {int(3 * baseline) + 1} or more (or fewer tests)')
        return 2
    survived, killed = [], 0
    for i, (node, desc) in enumerate(points):
        if args.only is not None and i not in args.only:
            continue
        # locate the same node in a fresh copy of the tree by its position in the walk
        fresh = copy.deepcopy(tree)
        index = [id(n) for n in ast.walk(tree)].index(id(node))
        target = list(ast.walk(fresh))[index]
        mutated = ast.fix_missing_locations(Replace(target, desc).visit(fresh))
        where = f'{args.module}:{node.lineno}: {desc} | {lines[node.lineno - 1].strip()[:90]}'
        signal.alarm(args.timeout)
        rebound = []
        try:
            exec(compile(mutated, path, 'exec'), module.__dict__)
            rebound = rebind(module, original)
            rc, failed = run_tests(args)
        except Timeout:
            rc, failed = 'timeout', f'past --timeout {args.timeout} s'
        except Exception as err:          # the mutant does not even load
            rc, failed = f'load: {type(err).__name__}', 'the mutant does not load'
        finally:
            signal.alarm(0)
            restore(module, original, rebound)
        if rc == 0:
            survived.append((i, where))
            print(f'SURVIVED {i:4d} {where}', flush=True)
        else:
            killed += 1
        print(f'done {i}: ' + ('survived' if rc == 0 else f'killed by {failed}'), file=sys.stderr, flush=True)
    tested = killed + len(survived)
    print(f'{args.module}: {tested} mutants, {killed} killed, {len(survived)} survived')
    return 0


if __name__ == '__main__':
    sys.exit(main())
