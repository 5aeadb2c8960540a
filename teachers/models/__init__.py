"""Built-in architectures; importing this package registers them.

``lenet5``, ``lenet5_bn``, ``lenet5_half``, ``lenet5_half_bn`` (:mod:`.lenet`), ``mlp``
(:mod:`.mlp`), ``resnet8``, ``resnet20``, ``resnet18``, ``resnet34`` (:mod:`.resnet`),
``wrn16_1``, ``wrn16_2``, ``wrn40_2`` (:mod:`.wrn`); torchvision classifiers as
``tv:<name>`` (:mod:`.tv`).
"""
from teachers.models import lenet, mlp, resnet, wrn  # noqa: F401  (registration)
from teachers.models.lenet import LeNet5
from teachers.models.mlp import MLP
from teachers.models.resnet import ResNet
from teachers.models.wrn import WideResNet

__all__ = ["LeNet5", "MLP", "ResNet", "WideResNet"]
