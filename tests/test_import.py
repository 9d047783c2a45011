import torch

import covrl


def test_kernel_info_reports_compiled_backends():
    info = covrl.kernel_info()
    assert info["extension"], info["error"]
    assert "cpu" in info["backends"]
    assert info["cuda_available"] == torch.cuda.is_available()
