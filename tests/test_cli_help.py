import subprocess
import sys


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from ckptsel.cli import main\n"
        "r = CliRunner().invoke(main, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'ls' in r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'mergekit', 'lm_eval') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"--help imported {out.stdout.strip()}"


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "ckptsel", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "ckptsel" in out.stdout
