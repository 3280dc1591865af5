"""Installs ztier into a temporary prefix and uses it as a user would: from a
clean environment (env -i PATH=/usr/bin:/bin), in a directory outside the
source tree, so that nothing is found through the build or source tree
unless the installed files lead there.

  InstalledCli:    cmake --install, then bin/ztier plan / config check /
                   trace gen / replay by name, and the not-found error.
  InstalledPython: pip install ./python into a venv, then import ztier and
                   call into libztier found through the venv's prefix, through
                   LD_LIBRARY_PATH, or through the path `cmake --install
                   --component python` recorded; and the not-found error.

tests/install/CMakeLists.txt passes the build's paths in the environment.
A missing prerequisite (venv, pip, setuptools) fails the test, naming the
Debian package: CI must not pass without running it.
"""

import glob
import os
import shutil
import subprocess
import tempfile
import unittest

BUILD = os.environ["ZTIER_BUILD_DIR"]
CMAKE = os.environ["ZTIER_CMAKE"]
SOURCE = os.environ["ZTIER_SOURCE_DIR"]
VERSION = os.environ["ZTIER_VERSION"]
PYTHON = os.environ.get("ZTIER_PYTHON3", "/usr/bin/python3")
PYTHON_SITE = os.environ.get("ZTIER_PYTHON_INSTALL_DIR", "")
CLEAN_PATH = "/usr/bin:/bin"


def run(argv, cwd, env=None, check=True):
    """Runs argv with only PATH (plus `env`) set; returns the finished
    process. With check, a failure shows the command and its output."""
    full_env = {"PATH": CLEAN_PATH, "HOME": cwd}
    full_env.update(env or {})
    p = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True,
                       timeout=600, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {p.returncode}\n"
                             f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def cmake_install(prefix, cwd, *extra):
    run([CMAKE, "--install", BUILD, "--prefix", prefix, *extra], cwd=cwd)


class Scratch(unittest.TestCase):
    """A temporary directory outside the source tree, removed afterwards."""

    def setUp(self):
        self.tmp = os.path.realpath(tempfile.mkdtemp(prefix="ztier-install-test-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.assertFalse(self.tmp.startswith(os.path.realpath(SOURCE) + os.sep),
                         "the scratch folder must lie outside the source tree")
        self.cwd = os.path.join(self.tmp, "work")
        os.mkdir(self.cwd)


class InstalledCli(Scratch):

    def setUp(self):
        super().setUp()
        self.prefix = os.path.join(self.tmp, "prefix")
        cmake_install(self.prefix, self.cwd)
        self.ztier = os.path.join(self.prefix, "bin", "ztier")
        self.share = os.path.join(self.prefix, "share", "ztier", "configs")

    def ztier_run(self, *args, check=True):
        return run([self.ztier, *args], cwd=self.cwd, check=check)

    def test_tree_holds_command_library_and_configs(self):
        for rel in ["bin/ztier", "include/ztier/ztier.h", "lib/pkgconfig/ztier.pc",
                    "share/ztier/configs/default.yaml",
                    "share/ztier/configs/models/llama2-7b.yaml",
                    "share/ztier/configs/examples/one_nvme.yaml",
                    "share/ztier/configs/traces/gpt2_tied.json"]:
            self.assertTrue(os.path.isfile(os.path.join(self.prefix, rel)), rel)
        self.assertTrue(os.access(self.ztier, os.X_OK))
        self.assertTrue(glob.glob(os.path.join(self.prefix, "lib*", "**", "libztier.so.0"),
                                  recursive=True))

    def test_plan_by_name(self):
        out = self.ztier_run("plan", "--model", "llama2-7b").stdout
        self.assertIn("ztier plan: llama2-7b (6738415616 parameters)", out)
        self.assertIn("fits:", out)

    def test_config_check_defaults_to_the_shipped_config(self):
        out = self.ztier_run("config", "check").stdout
        self.assertTrue(out.startswith(os.path.join(self.share, "default.yaml") + ": ok"), out)
        out = self.ztier_run("config", "check", "examples/host_only").stdout
        self.assertIn(os.path.join(self.share, "examples", "host_only.yaml") + ": ok", out)

    def test_trace_gen_and_replay_by_name(self):
        self.ztier_run("trace", "gen", "--model", "tiny", "--steps", "2", "-o", "t.json")
        info = self.ztier_run("trace", "info", "t.json").stdout
        self.assertIn("model tiny", info)
        self.assertIn("steps:    2", info)
        out = self.ztier_run("replay", "--trace", "gpt2_tied", "--null-io").stdout
        self.assertIn("prefetch hit rate", out)

    def test_finds_names_in_the_install_tree_not_only_the_source_tree(self):
        # A shape that only the install tree has: found through <exe>/../share.
        shutil.copy(os.path.join(self.share, "models", "tiny.yaml"),
                    os.path.join(self.share, "models", "only-installed.yaml"))
        self.ztier_run("trace", "gen", "--model", "only-installed", "-o", "t.json")
        # And from a moved tree (the path is relative to the executable).
        moved = os.path.join(self.tmp, "moved")
        shutil.move(self.prefix, moved)
        self.ztier = os.path.join(moved, "bin", "ztier")
        self.ztier_run("trace", "gen", "--model", "only-installed", "-o", "t2.json")

    def test_unknown_name_lists_every_place_looked(self):
        p = self.ztier_run("plan", "--model", "no-such-model", check=False)
        self.assertEqual(p.returncode, 2, p.stderr)
        err = p.stderr
        self.assertIn("model 'no-such-model' is neither a file nor a name", err)
        self.assertIn(os.path.join(self.share, "models") + " (no no-such-model.yaml)", err)
        self.assertIn(os.path.join(self.cwd, "configs", "models") + " (no such folder)", err)
        self.assertIn("llama2-7b", err)  # the known names
        p = self.ztier_run("trace", "gen", "--model", "no-such-model", check=False)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn(os.path.join(self.share, "models") + " (no no-such-model.yaml)", p.stderr)


# Imports the package, calls into the library, and prints the library's file
# (from /proc/self/maps: ctypes only knows the name it was given).
PROBE = """
import ztier
print("version", ztier.version_string())
print("status", ztier.status_string(ztier.Status.NOT_FOUND))
print("package", ztier.__file__)
with open("/proc/self/maps") as f:
    print("library", next(l.split()[-1] for l in f if "libztier.so" in l))
"""


def make_venv(tmp, cwd):
    """A venv under `tmp` with ./python pip-installed offline; its python.
    Fails, naming the Debian package, where venv or pip cannot work."""
    venv = os.path.join(tmp, "venv")
    p = run([PYTHON, "-m", "venv", "--system-site-packages", venv], cwd=cwd, check=False)
    if p.returncode != 0:
        raise AssertionError(f"{PYTHON} -m venv failed (install python3-venv: "
                             f"scripts/setup.sh):\n{p.stderr}")
    python = os.path.join(venv, "bin", "python")
    # A copy: pip builds in the folder it is given (build/, *.egg-info).
    src = os.path.join(tmp, "src")
    shutil.copytree(os.path.join(SOURCE, "python"), src,
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    p = run([python, "-m", "pip", "install", "--no-index", "--no-build-isolation",
             "--no-cache-dir", src], cwd=cwd, check=False)
    if p.returncode != 0:
        raise AssertionError("pip install --no-index --no-build-isolation ./python failed "
                             "(needs python3-pip, python3-setuptools: scripts/setup.sh):\n"
                             f"{p.stdout}\n{p.stderr}")
    return venv, python


def probe(python, cwd, env=None, check=True):
    """Runs PROBE; the process and its "key value" lines as a dict."""
    p = run([python, "-c", PROBE], cwd=cwd, env=env, check=check)
    return p, dict(l.split(" ", 1) for l in p.stdout.splitlines() if " " in l)


def installed_libdir(prefix):
    found = glob.glob(os.path.join(prefix, "lib*", "**", "libztier.so.0"), recursive=True)
    assert found, f"no libztier.so.0 under {prefix}"
    return os.path.dirname(found[0])


class InstalledPython(unittest.TestCase):
    """One venv for the cases that leave it as it is (it takes seconds)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = os.path.realpath(tempfile.mkdtemp(prefix="ztier-install-test-"))
        cls.cwd = os.path.join(cls.tmp, "work")
        os.mkdir(cls.cwd)
        try:
            cls.venv, cls.python = make_venv(cls.tmp, cls.cwd)
        except BaseException:
            shutil.rmtree(cls.tmp, True)
            raise

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, True)

    def test_outside_the_source_tree(self):
        self.assertFalse(self.tmp.startswith(os.path.realpath(SOURCE) + os.sep))

    def test_installed_version_matches_the_library(self):
        p = run([self.python, "-m", "pip", "show", "ztier"], cwd=self.cwd)
        self.assertIn(f"Version: {VERSION}", p.stdout)

    def test_not_found_lists_every_place_tried(self):
        p, _ = probe(self.python, self.cwd, check=False)
        self.assertNotEqual(p.returncode, 0)
        err = p.stderr
        self.assertIn("OSError: libztier.so not found; tried:", err)
        site = glob.glob(os.path.join(self.venv, "lib", "python3*", "site-packages", "ztier"))
        self.assertEqual(len(site), 1, site)
        self.assertIn(os.path.join(site[0], "libztier.so*") + ": no such file", err)
        self.assertIn(os.path.join(self.venv, "lib", "libztier.so.0") + ": no such file", err)
        self.assertIn("dynamic loader's path (LD_LIBRARY_PATH=unset, ldconfig)", err)
        self.assertIn("Set ZTIER_LIBRARY", err)  # how to fix it
        self.assertNotIn("build/lib", err)  # no source tree around an installed package

    def test_found_through_ld_library_path(self):
        prefix = os.path.join(self.tmp, "prefix")
        cmake_install(prefix, self.cwd)
        libdir = installed_libdir(prefix)
        _, out = probe(self.python, self.cwd, env={"LD_LIBRARY_PATH": libdir})
        self.assertEqual(out["version"], VERSION)
        self.assertEqual(out["status"], "ZTIER_STATUS_NOT_FOUND")
        self.assertTrue(out["library"].startswith(libdir + os.sep), out)
        self.assertTrue(out["package"].startswith(self.venv + os.sep), out)


class PythonInPrefix(Scratch):
    """The library and the package under one prefix, without LD_LIBRARY_PATH."""

    def test_found_in_the_venv_prefix(self):
        # `cmake --install --prefix <venv>`: the library in sys.prefix/lib.
        venv, python = make_venv(self.tmp, self.cwd)
        cmake_install(venv, self.cwd)
        _, out = probe(python, self.cwd)
        self.assertEqual(out["version"], VERSION)
        self.assertTrue(out["library"].startswith(installed_libdir(venv) + os.sep), out)

    def test_cmake_installed_package_finds_its_library(self):
        # `--component python` (ZTIER_INSTALL_PYTHON=ON does it always): the
        # package under <prefix>/<ZTIER_PYTHON_INSTALL_DIR>, found through the
        # path recorded beside it, by the system interpreter.
        self.assertTrue(PYTHON_SITE, "ZTIER_PYTHON_INSTALL_DIR not passed by CMake")
        prefix = os.path.join(self.tmp, "prefix")
        cmake_install(prefix, self.cwd)
        cmake_install(prefix, self.cwd, "--component", "python")
        site = os.path.join(prefix, PYTHON_SITE)
        self.assertTrue(os.path.isfile(os.path.join(site, "ztier", "_install_paths.py")))
        _, out = probe(PYTHON, self.cwd, env={"PYTHONPATH": site})
        self.assertEqual(out["version"], VERSION)
        self.assertTrue(out["package"].startswith(site + os.sep), out)
        self.assertTrue(out["library"].startswith(installed_libdir(prefix) + os.sep), out)


if __name__ == "__main__":
    unittest.main()
