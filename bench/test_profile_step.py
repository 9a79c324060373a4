"""bench/profile_step.py's summary of Nsight Compute's CSV (the format of `ncu --csv --page raw
--print-units base`, with its log lines and units row), so the GPU session only has to run it."""

import pytest

import profile_step

HEADER = (
    '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
    '"Block Size","Grid Size",'
    '"Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum",'
    '"lts__t_sector_hit_rate.pct"'
)
UNITS = '"","","","","","","","","","","","byte","byte","nsecond","%"'


def row(i, name, read, write, ns, hit):
    return (
        f'"{i}","1","python3","host","{name}","1","7","(128, 1, 1)","(512, 1, 1)","0","9.0",'
        f'"{read}","{write}","{ns}","{hit}"'
    )


def test_summary_table_per_kernel_and_total(tmp_path):
    path = tmp_path / "ncu.csv"
    path.write_text(
        "\n".join(
            [
                "==PROF== Connected to process 1",
                HEADER,
                UNITS,
                row(0, "_pool_kernel", "33,554,432", "32768", "12000", "10.5"),
                row(1, "_scale_kernel", "50331648", "33554432", "30000", "40.0"),
            ]
        )
        + "\n"
    )
    rows = profile_step.read_ncu_csv(str(path))
    assert [r["kernel"] for r in rows] == ["_pool_kernel", "_scale_kernel"]
    table = profile_step.summarize(rows).splitlines()
    assert table[2] == "| _pool_kernel | 12.0 | 33.55 | 0.03 | 2799 | 10.5 |"
    assert table[3] == "| _scale_kernel | 30.0 | 50.33 | 33.55 | 2796 | 40.0 |"
    assert table[4].startswith("| all 2 kernels | 42.0 | 83.89 | 33.59 |")


def test_missing_metrics_are_named(tmp_path, capsys):
    path = tmp_path / "ncu.csv"
    path.write_text('"ID","Kernel Name","gpu__time_duration.sum"\n"0","k","1"\n')
    with pytest.raises(SystemExit):
        profile_step.main(["summarize", str(path)])
    assert (
        "metrics ['dram__bytes_read.sum', 'dram__bytes_write.sum', "
        "'lts__t_sector_hit_rate.pct'] missing" in capsys.readouterr().err
    )
