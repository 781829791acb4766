using Vmm.Mm;

namespace Vmm.Tests.Diagnostics;

/// <summary>
/// The fault-injection settings themselves (Diagnostics/FaultInjection.cs, Linux's fault_attr): checked
/// and named when wrong, deterministic for a seed, and interval, space and times counted as Linux counts
/// them. The sweep of every public call under injection is Robustness/FaultInjectionTests.cs.
/// </summary>
[TestFixture]
[Category("Smoke")]
public sealed class FaultInjectionSettingsTests
{
    private const int Page = 4096;

    [Test]
    public void The_same_seed_fails_the_same_allocations()
    {
        static long[] Failures(ulong seed)
        {
            using MachineWithRegion region = TestMachines.CreateWithRegion(64 * Page, options: TestMachines.Small with { FaultInjection = new FaultInjection { Seed = seed, Probability = 0.25 } });
            (Machine machine, VmProcess p, ulong va, _) = region;
            var failedAt = new List<long>();
            for (int i = 0; i < 64; i++)
            {
                try
                {
                    p.Write<int>(va + (ulong)(i * Page), i);
                }
                catch (InsufficientMemoryException)
                {
                    failedAt.Add(i);
                }
            }
            return [.. failedAt];
        }
        long[] first = Failures(42);
        Assert.That(first, Is.Not.Empty, "a quarter of 64 allocations failed");
        Assert.That(Failures(42), Is.EqualTo(first), "same seed, same calls: same failures");
        Assert.That(Failures(43), Is.Not.EqualTo(first), "another seed fails other allocations");
    }

    [Test]
    public void Fault_injection_settings_are_checked_and_name_the_option()
    {
        Assert.That(() => new Machine(TestMachines.Small with { FaultInjection = new FaultInjection { Probability = 1.5 } }),
            Throws.InstanceOf<ArgumentOutOfRangeException>().With.Message.Contains("Probability"));
        Assert.That(() => new Machine(TestMachines.Small with { FaultInjection = new FaultInjection { Interval = 0 } }),
            Throws.InstanceOf<ArgumentOutOfRangeException>().With.Message.Contains("Interval"));
    }

    [Test]
    public void Interval_space_and_times_follow_linux_fault_attr()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(16 * Page, options: TestMachines.Small with { FaultInjection = new FaultInjection { Space = 3, Interval = 2, Times = 2, IgnoreUnmovable = true } });
        (Machine machine, VmProcess p, ulong va, _) = region;
        var failedAt = new List<int>();
        for (int i = 0; i < 16; i++)
        {
            try
            {
                p.Write<int>(va + (ulong)(i * Page), i);
            }
            catch (InsufficientMemoryException)
            {
                failedAt.Add(i);
            }
        }
        // Movable allocations only (page tables ignored), one per write: calls 1-3 pass (space), then
        // every second one fails (calls 5 and 7), and then no more (times).
        Assert.That(failedAt, Is.EqualTo((int[])[4, 6]), "the 5th and 7th allocations fail, and only they");
        Assert.That(machine.GetFaultInjectionStats().FrameAllocationFailures, Is.EqualTo(2));
    }
}
