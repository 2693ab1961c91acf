from fashionbench.machine import cpu_model
from fashionbench.report import _hardware


def test_cpu_model_names_family_model_and_the_widest_vector_extension():
    zen4 = {"model name": "AMD EPYC", "cpu family": "25", "model": "17",
            "flags": "fpu sse avx2 avx512f avx512_bf16 avx512_vnni"}
    zen1 = {"model name": "AMD EPYC", "cpu family": "23", "model": "1", "flags": "fpu sse avx2 fma"}
    sapphire = {"model name": "Intel Xeon", "cpu family": "6", "model": "143",
                "flags": "avx2 avx512f avx512_bf16 amx_tile amx_bf16"}
    assert cpu_model(zen4) == "AMD EPYC (family 25 model 17, AVX512-BF16)"
    assert cpu_model(zen1) == "AMD EPYC (family 23 model 1, AVX2)"
    assert cpu_model(sapphire) == "Intel Xeon (family 6 model 143, AMX)"


def test_cpu_model_without_cpuinfo_fields_is_the_bare_name():
    assert cpu_model({"model name": "Apple M2"}) == "Apple M2"


def test_hardware_column_adds_the_precision_where_a_run_recorded_it():
    train = {"device": "cpu", "hardware": "AMD EPYC (family 25 model 17, AVX512-BF16)", "threads": 2}
    assert _hardware(train) == "cpu: AMD EPYC (family 25 model 17, AVX512-BF16), 2 threads"
    assert _hardware(train | {"precision": "bf16"}).endswith("2 threads, bf16")
