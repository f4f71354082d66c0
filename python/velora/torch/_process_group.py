"""The process group of a VeloraLinear whose v is shared by the data-parallel ranks: the checks
when sharing is asked for, and the group its first forward reduces over."""
import torch.distributed as dist

# v modes whose v a shared first batch can fix. random (its seed) and given (the caller's set_v)
# are the same on every rank already, so sharing leaves them as they are; batch_mean and ema
# change v at every batch, which one shared first batch cannot (velora::share_first_batch_v
# refuses them too).
SHAREABLE_V_MODES = ("first_batch_mean", "random", "given")


def check_shareable(function, v_mode, process_group):
    """ValueError naming `function` for a v mode that cannot be shared or a process group this
    process cannot use; None (the default group, resolved at the first forward) is accepted."""
    if v_mode not in SHAREABLE_V_MODES:
        raise ValueError(f"{function}: argument 'v' is {v_mode!r}; a v shared by the ranks needs 'first_batch_mean' "
                         "(or 'random' / 'given', the same on every rank already); 'batch_mean' and 'ema' change v at every batch")
    if process_group is None:
        return
    if not dist.is_available():
        raise ValueError(f"{function}: argument 'process_group' is given but this torch has no torch.distributed")
    if process_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"{function}: argument 'process_group': this process is not a member of the group "
                         "(torch.distributed.new_group returned GroupMember.NON_GROUP_MEMBER here)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(f"{function}: argument 'process_group' is a {type(process_group).__name__}, "
                         "not a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD, or None for the default group)")
    if dist.get_rank(process_group) < 0:
        raise ValueError(f"{function}: argument 'process_group': this process is not a member of the group")


def group_for_forward(process_group):
    """The group a first forward reduces over, or None when there is none to reduce over: no
    group was given and torch.distributed is not initialised (one process, whose v is its own
    first batch's, as a group of one would give it)."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None
