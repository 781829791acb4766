namespace Vmm.Tests.Mm;

/// <summary>
/// madvise accepts exactly the values of the <see cref="Advice"/> enum (there is no second list), so every
/// value of the enum must have a specified effect: a value added to the enum without an implementation
/// would otherwise be accepted and do nothing. This table is that specification; it must name every value.
/// </summary>
[Category("Smoke")]
public sealed class MadviseAdviceTests
{
    private const ulong Pages = 4;
    private const byte Fill = 0xAB;

    /// <summary>What each advice does to a written private region: the bytes read afterwards (null: the
    /// read throws <see cref="BusError"/>), and whether the process then has a VM_MERGEABLE VMA.</summary>
    private static readonly Dictionary<Advice, (byte? Reads, bool Mergeable)> Effects = new()
    {
        [Advice.Normal] = (Fill, false),
        [Advice.WillNeed] = (Fill, false),
        [Advice.DontNeed] = (0, false),     // private anonymous memory reads zero after DONTNEED
        [Advice.Mergeable] = (Fill, true),
        [Advice.Unmergeable] = (Fill, false),
        [Advice.HwPoison] = (null, false),  // every page poisoned: a read is a bus error
        [Advice.SoftOffline] = (Fill, false), // every page moved to a new frame, contents kept
    };

    [Test]
    public void The_effect_table_names_every_value_of_the_Advice_enum()
    {
        Assert.That(Effects.Keys, Is.EquivalentTo(Enum.GetValues<Advice>()),
            "madvise accepts every enum value, so each one needs a specified (and implemented) effect");
    }

    [Test]
    public void Every_advice_of_the_enum_is_accepted_and_has_its_specified_effect(
        [Values] Advice advice) // [Values] on an enum: every value it defines
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(Pages * (ulong)Topology.PageSize, Fill, TestMachines.TwoLargeNodes);
        Assert.That(Effects.TryGetValue(advice, out (byte? Reads, bool Mergeable) expected), Is.True, $"{advice} has a specified effect");

        Assert.That(m.Process.Madvise(m.Va, m.Bytes, advice), Is.EqualTo(Errno.None), $"{advice} is a value madvise implements");

        byte[] bytes = new byte[m.Bytes];
        if (expected.Reads is byte reads)
        {
            m.Process.Read(m.Va, bytes);
            Assert.That(bytes, Is.All.EqualTo(reads), $"what {advice} leaves in the region");
        }
        else
        {
            Assert.Throws<BusError>(() => m.Process.Read(m.Va, bytes), $"{advice} leaves poison in the region");
        }
        Assert.That(m.Process.GetKsmStats().Mergeable, Is.EqualTo(expected.Mergeable), $"whether {advice} makes the region VM_MERGEABLE");
        TestMachines.AssertAuditClean(m.Machine);
    }

    [Test]
    public void A_value_outside_the_enum_is_EINVAL_and_changes_nothing()
    {
        using MachineWithRegion m = TestMachines.CreateWithRegion(Pages * (ulong)Topology.PageSize, Fill, TestMachines.TwoLargeNodes);
        Assert.That(m.Process.Madvise(m.Va, m.Bytes, (Advice)8), Is.EqualTo(Errno.EINVAL), "8 is MADV_FREE on Linux, which Vmm does not implement");
        byte[] bytes = new byte[m.Bytes];
        m.Process.Read(m.Va, bytes);
        Assert.That(bytes, Is.All.EqualTo(Fill), "a refused advice leaves the memory as it was");
    }
}
