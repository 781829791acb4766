using NUnit.Framework;

namespace Vmm.Tests;

/// <summary>setuid / seteuid / setresuid / capset as Linux's kernel/sys.c and commoncap.c: who may set which id, and the capabilities that go with uid 0.</summary>
[TestFixture]
[Category("Smoke")]
public sealed class CredentialsTests
{
    [Test]
    public void Root_setuid_sets_all_three_ids_and_drops_every_capability()
    {
        using Machine machine = TestMachines.Create(TestMachines.Small);
        VmProcess p = machine.CreateProcess();
        Assert.That(p.SetUid(1000), Is.EqualTo(Errno.None));
        Credentials c = p.Credentials;
        Assert.That((c.Uid, c.EffectiveUid, c.SavedUid), Is.EqualTo((1000, 1000, 1000)), "CAP_SETUID sets real, effective and saved ids");
        Assert.That(c.Capabilities, Is.EqualTo(Capabilities.None), "leaving uid 0 everywhere clears the effective set");
        Assert.That(c.PermittedCapabilities, Is.EqualTo(Capabilities.None), "and the permitted set");
        Assert.That(p.SetUid(0), Is.EqualTo(Errno.EPERM), "there is no way back");
    }

    [Test]
    public void Seteuid_drops_privileges_temporarily_and_takes_them_back()
    {
        using Machine machine = TestMachines.Create(TestMachines.Small);
        VmProcess p = machine.CreateProcess();
        Assert.That(p.SetEuid(1000), Is.EqualTo(Errno.None));
        Assert.That(p.Credentials.Capabilities, Is.EqualTo(Capabilities.None), "an effective uid leaving 0 clears the effective set");
        Assert.That(p.Credentials.PermittedCapabilities.HasFlag(Capabilities.SysNice), Is.True, "the permitted set stays while the saved uid is 0");
        Assert.That(p.Credentials.MayMovePagesOf(Credentials.User(2000)), Is.False, "without CAP_SYS_NICE another user's pages are out of reach");
        Assert.That(p.SetEuid(0), Is.EqualTo(Errno.None), "the real and saved uid are still 0");
        Assert.That(p.Credentials.Capabilities, Is.EqualTo(Credentials.Root.Capabilities), "an effective uid back at 0 restores the effective set");
        Assert.That(p.Credentials.MayMovePagesOf(Credentials.User(2000)), Is.True, "CAP_SYS_NICE is back");
    }

    [Test]
    public void An_unprivileged_process_may_only_switch_between_its_own_ids()
    {
        using Machine machine = TestMachines.Create(TestMachines.Small);
        VmProcess p = machine.CreateProcess(Credentials.User(1000) with { SavedUid = 1001 });
        Assert.That(p.SetUid(2000), Is.EqualTo(Errno.EPERM), "not one of its ids");
        Assert.That(p.SetUid(1001), Is.EqualTo(Errno.None), "the saved id");
        Assert.That((p.Credentials.Uid, p.Credentials.EffectiveUid), Is.EqualTo((1000, 1001)), "unprivileged setuid changes only the effective id");
        Assert.That(p.SetResUid(1001, 1000, -1), Is.EqualTo(Errno.None), "swapping between its own ids");
        Assert.That((p.Credentials.Uid, p.Credentials.EffectiveUid, p.Credentials.SavedUid), Is.EqualTo((1001, 1000, 1001)));
        Assert.That(p.SetResUid(-1, 0, -1), Is.EqualTo(Errno.EPERM), "root is not among its ids");
        Assert.That(p.SetResUid(-2, -1, -1), Is.EqualTo(Errno.EINVAL), "-1 is the only negative id accepted");
        Assert.That(p.SetUid(-1), Is.EqualTo(Errno.EINVAL));
    }

    [Test]
    public void Capset_only_lowers_and_a_fork_inherits_the_current_credentials()
    {
        using Machine machine = TestMachines.Create(TestMachines.Small);
        VmProcess p = machine.CreateProcess();
        Assert.That(p.Capset(Capabilities.SysNice, Capabilities.SysNice | Capabilities.SetUid), Is.EqualTo(Errno.None));
        Assert.That(p.Capset(Capabilities.SysAdmin), Is.EqualTo(Errno.EPERM), "CAP_SYS_ADMIN is no longer permitted");
        Assert.That(p.Capset(Capabilities.SetUid, Capabilities.SysNice), Is.EqualTo(Errno.EPERM), "effective outside permitted");
        Assert.That(p.Capset(Capabilities.SetUid), Is.EqualTo(Errno.None), "within permitted");
        VmProcess child = p.Fork();
        Assert.That(child.Credentials, Is.EqualTo(p.Credentials), "fork copies the credentials as they are now");
        Assert.That(child.Credentials.Has(Capabilities.SysNice), Is.False);
    }

    [Test]
    public void Moving_pages_of_another_process_follows_linux_uid_rules()
    {
        Credentials alice = Credentials.User(1000), bob = Credentials.User(2000);
        Assert.That(alice.MayMovePagesOf(alice), Is.True, "same real uid");
        Assert.That(alice.MayMovePagesOf(bob), Is.False, "another user without CAP_SYS_NICE");
        Assert.That(alice.MayMovePagesOf(bob with { SavedUid = 1000 }), Is.True, "the target's saved uid is the caller's");
        Assert.That((alice with { EffectiveUid = 2000 }).MayMovePagesOf(bob), Is.True, "the caller's effective uid is the target's");
        Assert.That((alice with { Capabilities = Capabilities.SysNice }).MayMovePagesOf(bob), Is.True, "CAP_SYS_NICE");
    }
}
