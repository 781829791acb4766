// A process's credentials and the calls that change them (Linux's setuid, seteuid, setresuid and
// capset, kernel/sys.c and security/commoncap.c). Permission checks (move_pages, migrate_pages,
// MPOL_MF_MOVE_ALL, cpuset moves) always read the current credentials.
//
// Rules, as Linux: a process with CAP_SETUID sets any ids; one without may only set each id to one of
// its current real, effective or saved ids (setuid without it changes only the effective id). Changing
// ids drops capabilities as cap_emulate_setxuid does without SECBIT_KEEP_CAPS: leaving uid 0 in all
// three ids clears the permitted and effective sets; an effective id leaving 0 clears the effective
// set; an effective id returning to 0 restores it from the permitted set. capset only lowers: the new
// permitted set within the old one, the effective set within the new permitted one.
//
// Locking: _credentialsLock guards the one Credentials value (a struct of several words); readers take
// it too, so no reader sees half an update.
using Vmm.Diagnostics;

namespace Vmm;

public sealed partial class VmProcess
{
    private readonly Lock _credentialsLock = new();
    private Credentials _credentials;

    /// <summary>setuid: with CAP_SETUID, sets the real, effective and saved user ids; without it, sets the effective id to the real or saved one.</summary>
    /// <returns>None; EINVAL for a negative uid; EPERM when not allowed.</returns>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno SetUid(int uid)
    {
        using MachineCall call = Machine.EnterCall();
        if (uid < 0)
            return Errno.EINVAL;
        lock (_credentialsLock)
        {
            Credentials old = _credentials;
            if (old.Has(Capabilities.SetUid))
                return Change(old, uid, uid, uid);
            if (uid != old.Uid && uid != old.SavedUid)
                return Errno.EPERM;
            return Change(old, old.Uid, uid, old.SavedUid);
        }
    }

    /// <summary>seteuid: sets the effective user id (any with CAP_SETUID; otherwise the real, effective or saved one).</summary>
    /// <returns>None; EINVAL for a negative uid; EPERM when not allowed.</returns>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno SetEuid(int euid) => euid < 0 ? Errno.EINVAL : SetResUid(-1, euid, -1);

    /// <summary>setresuid: sets the real, effective and saved user ids; -1 leaves one unchanged. Without
    /// CAP_SETUID each new id must be one of the current three.</summary>
    /// <returns>None; EINVAL for an id below -1; EPERM when not allowed (nothing changes).</returns>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno SetResUid(int ruid, int euid, int suid)
    {
        using MachineCall call = Machine.EnterCall();
        if (ruid < -1 || euid < -1 || suid < -1)
            return Errno.EINVAL;
        lock (_credentialsLock)
        {
            Credentials old = _credentials;
            if (!old.Has(Capabilities.SetUid) && !(Allowed(ruid) && Allowed(euid) && Allowed(suid)))
                return Errno.EPERM;
            return Change(old, ruid == -1 ? old.Uid : ruid, euid == -1 ? old.EffectiveUid : euid, suid == -1 ? old.SavedUid : suid);

            bool Allowed(int id) => id == -1 || id == old.Uid || id == old.EffectiveUid || id == old.SavedUid;
        }
    }

    /// <summary>capset: sets the effective and permitted capabilities. Only lowers: the new permitted set
    /// must lie within the current one, and the effective set within the new permitted set.</summary>
    /// <returns>None; EPERM when a capability would be gained (nothing changes).</returns>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Capset(Capabilities effective, Capabilities permitted)
    {
        using MachineCall call = Machine.EnterCall();
        lock (_credentialsLock)
        {
            Credentials old = _credentials;
            if ((permitted & ~old.PermittedCapabilities) != 0 || (effective & ~permitted) != 0)
                return Errno.EPERM;
            _credentials = old with { Capabilities = effective, PermittedCapabilities = permitted };
            return Errno.None;
        }
    }

    /// <summary>capset with the permitted set unchanged: sets the effective capabilities within it.</summary>
    /// <returns>None; EPERM when <paramref name="effective"/> is not within the permitted set.</returns>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public Errno Capset(Capabilities effective) => Capset(effective, Credentials.PermittedCapabilities);

    /// <summary>Applies new ids and cap_emulate_setxuid's capability rules. Preconditions: _credentialsLock held.</summary>
    private Errno Change(Credentials old, int ruid, int euid, int suid)
    {
        LockAssert.Held(_credentialsLock, "the process's credentials lock");
        Capabilities permitted = old.PermittedCapabilities, effective = old.Capabilities;
        bool hadRoot = old.Uid == 0 || old.EffectiveUid == 0 || old.SavedUid == 0;
        if (hadRoot && ruid != 0 && euid != 0 && suid != 0)
            permitted = effective = Capabilities.None;
        else if (old.EffectiveUid == 0 && euid != 0)
            effective = Capabilities.None;
        else if (old.EffectiveUid != 0 && euid == 0)
            effective = permitted;
        _credentials = new Credentials(ruid, effective) { EffectiveUid = euid, SavedUid = suid, PermittedCapabilities = permitted };
        return Errno.None;
    }
}
