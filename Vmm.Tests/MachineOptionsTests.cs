using Vmm.Native;

namespace Vmm.Tests;

/// <summary>MachineOptions refuses what cannot work, naming the option, before anything is allocated.</summary>
[TestFixture]
[Category("Smoke")]
public sealed class MachineOptionsTests
{
    /// <summary>Validate and the Machine constructor both refuse <paramref name="options"/> with exactly <typeparamref name="T"/> naming <paramref name="option"/>.</summary>
    private static void AssertRefused<T>(MachineOptions options, string option)
        where T : ArgumentException
    {
        T fromValidate = Assert.Throws<T>(options.Validate)!;
        Assert.That(fromValidate.ParamName, Is.EqualTo(option), "ParamName names the option");
        Assert.That(fromValidate.Message, Does.Contain(option), "the message names the option");
        T fromMachine = Assert.Throws<T>(() => new Machine(options).Dispose())!;
        Assert.That(fromMachine.ParamName, Is.EqualTo(option));
    }

    [Test]
    public void The_defaults_and_the_small_test_machine_are_valid()
    {
        Assert.DoesNotThrow(new MachineOptions().Validate);
        Assert.DoesNotThrow(TestMachines.Small.Validate);
    }

    [TestCase(0)]
    [TestCase(-1)]
    [TestCase(65)]
    public void NodeCount_must_be_1_to_64(int nodes) =>
        AssertRefused<ArgumentOutOfRangeException>(TestMachines.Small with { NodeCount = nodes }, nameof(MachineOptions.NodeCount));

    [Test]
    public void Sixty_four_nodes_are_fine()
    {
        using var machine = TestMachines.Create(TestMachines.Small with { NodeCount = 64 });
        Assert.That(machine.Topology.NodeCount, Is.EqualTo(64));
    }

    [TestCase(1L << 20)]
    [TestCase(0L)]
    [TestCase(-(2L << 20))]
    public void BlockSizeBytes_must_be_at_least_one_pageblock(long size) =>
        AssertRefused<ArgumentOutOfRangeException>(TestMachines.Small with { BlockSizeBytes = size }, nameof(MachineOptions.BlockSizeBytes));

    [Test]
    public void BlockSizeBytes_must_be_a_power_of_two() =>
        AssertRefused<ArgumentOutOfRangeException>(TestMachines.Small with { BlockSizeBytes = 6L << 20, NodeSizeBytes = 12L << 20 }, nameof(MachineOptions.BlockSizeBytes));

    [TestCase(0L)]
    [TestCase(-(4L << 20))]
    public void NodeSizeBytes_must_be_positive(long size) =>
        AssertRefused<ArgumentOutOfRangeException>(TestMachines.Small with { NodeSizeBytes = size }, nameof(MachineOptions.NodeSizeBytes));

    [TestCase(3L << 20)]
    [TestCase(1L << 20)]
    public void NodeSizeBytes_must_be_a_whole_number_of_blocks(long size) =>
        AssertRefused<ArgumentException>(TestMachines.Small with { NodeSizeBytes = size }, nameof(MachineOptions.NodeSizeBytes));

    [TestCase(1, 1L << 44)]
    [TestCase(2, 1L << 43)]
    [TestCase(64, 1L << 40)]
    [TestCase(2, long.MaxValue - (long.MaxValue % (2L << 20)))]
    public void The_total_size_must_fit_32_bit_pfns(int nodes, long nodeSize) =>
        AssertRefused<ArgumentOutOfRangeException>(TestMachines.Small with { NodeCount = nodes, NodeSizeBytes = nodeSize }, nameof(MachineOptions.NodeSizeBytes));

    [Test]
    public void A_size_the_host_refuses_to_reserve_names_NodeSizeBytes()
    {
        // The portable arena is an ordinary heap allocation, which the kernel's overcommit heuristic
        // refuses when it exceeds RAM + swap. Only where that heuristic (or strict accounting) is on:
        // with overcommit_memory=1 the allocation would succeed and its clearing would exhaust the host.
        string? mode = File.Exists("/proc/sys/vm/overcommit_memory") ? File.ReadAllText("/proc/sys/vm/overcommit_memory").Trim() : null;
        if (mode is not ("0" or "2"))
            Assert.Ignore("needs Linux with vm.overcommit_memory 0 or 2 to make the host refuse a reservation safely");
        var options = TestMachines.Small with { NodeCount = 1, NodeSizeBytes = 8L << 40, BlockSizeBytes = 128L << 20, ForcePortableArena = true };
        Assert.DoesNotThrow(options.Validate, "the options themselves are fine");
        ArgumentException e = Assert.Throws<ArgumentException>(() => new Machine(options).Dispose())!;
        Assert.That(e.ParamName, Is.EqualTo(nameof(MachineOptions.NodeSizeBytes)));
        Assert.That(e.Message, Does.Contain(nameof(MachineOptions.NodeSizeBytes)));
        Assert.That(e.InnerException, Is.InstanceOf<ArenaException>(), "the host's refusal is the cause");
    }

    [TestCase(-1)]
    [TestCase(2)]
    [TestCase(3)]
    public void MovableBlocksPerNode_must_leave_ZONE_NORMAL_a_block(int movable) =>
        AssertRefused<ArgumentOutOfRangeException>(TestMachines.Small with { MovableBlocksPerNode = movable }, nameof(MachineOptions.MovableBlocksPerNode));

    [Test]
    public void Every_block_movable_is_refused_and_one_less_works()
    {
        var options = new MachineOptions { NodeCount = 2, NodeSizeBytes = 8L << 20, BlockSizeBytes = 2L << 20, MinFreeKbytes = 0 };
        ArgumentOutOfRangeException e = Assert.Throws<ArgumentOutOfRangeException>(() => new Machine(options with { MovableBlocksPerNode = 4 }))!;
        Assert.That(e.Message, Does.Contain("page tables"), "the message says why");
        using var machine = TestMachines.Create(options with { MovableBlocksPerNode = 3 });
        VmProcess process = machine.CreateProcess(homeNode: 1);
        ulong va = process.Mmap(1 << 20);
        Assert.That(process.Read<long>(va), Is.Zero, "the zero page and the page tables found ZONE_NORMAL");
        process.Write<long>(va, 1);
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void MinFreeKbytes_must_not_be_negative() =>
        AssertRefused<ArgumentOutOfRangeException>(TestMachines.Small with { MinFreeKbytes = -1 }, nameof(MachineOptions.MinFreeKbytes));

    [Test]
    public void MinFreeKbytes_must_be_less_than_ZONE_NORMAL()
    {
        // TestMachines.Small: 2 nodes, each one NORMAL block of 2 MiB: 4096 KiB of ZONE_NORMAL.
        AssertRefused<ArgumentOutOfRangeException>(TestMachines.Small with { MinFreeKbytes = 4096 }, nameof(MachineOptions.MinFreeKbytes));
        AssertRefused<ArgumentOutOfRangeException>(TestMachines.Small with { MinFreeKbytes = long.MaxValue }, nameof(MachineOptions.MinFreeKbytes));
        using var machine = TestMachines.Create(TestMachines.Small with { MinFreeKbytes = 4000 });
        Assert.That(machine.GetStats().Nodes[0].Zones[0].Watermarks.Min, Is.LessThan(512), "a large reserve still leaves the zone something");
    }

    [Test]
    public void NodeDistances_must_be_NodeCount_square() =>
        AssertRefused<ArgumentException>(TestMachines.Small with { NodeDistances = new[,] { { 10, 20, 20 }, { 20, 10, 20 } } }, nameof(MachineOptions.NodeDistances));

    [TestCase(0)]
    [TestCase(20)]
    [TestCase(-10)]
    public void A_nodes_distance_to_itself_must_be_LOCAL_DISTANCE(int local) =>
        AssertRefused<ArgumentException>(TestMachines.Small with { NodeDistances = new[,] { { 10, 20 }, { 20, local } } }, nameof(MachineOptions.NodeDistances));

    [TestCase(-1)]
    [TestCase(0)]
    [TestCase(10)]
    [TestCase(256)]
    public void A_distance_between_nodes_must_be_11_to_255(int remote) =>
        AssertRefused<ArgumentException>(TestMachines.Small with { NodeDistances = new[,] { { 10, remote }, { 20, 10 } } }, nameof(MachineOptions.NodeDistances));

    [Test]
    public void Asymmetric_distances_within_range_are_fine()
    {
        using var machine = TestMachines.Create(TestMachines.Small with { NodeDistances = new[,] { { 10, 11 }, { 255, 10 } } });
        Assert.That(machine.Allocator.NodeDistances[1, 0], Is.EqualTo(255));
    }
}
