using NUnit.Framework;

namespace Vmm.Tests.Migration;

[TestFixture]
[Category("Smoke")]
public class NodeMaskTests
{
    [Test]
    public void A_mask_prints_and_parses_in_linux_node_list_format()
    {
        NodeMask mask = NodeMask.Of(0, 1, 2, 5, 7, 8);
        Assert.That(mask.ToString(), Is.EqualTo("0-2,5,7-8"), "ranges of consecutive nodes collapse as cpuset.mems prints them");
        Assert.That(NodeMask.TryParse("0-2,5,7-8", out NodeMask parsed) && parsed == mask, Is.True, "the printed form parses back");
        Assert.That(NodeMask.TryParse("", out NodeMask empty) && empty.IsEmpty, Is.True, "an empty list is the empty set");
        Assert.That(NodeMask.TryParse("3-1", out _), Is.False, "a backwards range is not a node list");
        Assert.That(NodeMask.TryParse("64", out _), Is.False, "node 64 does not exist");
        Assert.That(NodeMask.TryParse("1,,2", out _), Is.False, "an empty element is not a node");
    }

    [Test]
    public void Set_operations_follow_the_bits()
    {
        NodeMask a = NodeMask.Of(0, 3), b = NodeMask.Of(3, 4);
        Assert.That((a & b).Nodes.Single(), Is.EqualTo(3), "intersection");
        Assert.That((a | b).Count, Is.EqualTo(3), "union");
        Assert.That(a.First, Is.EqualTo(0), "first node");
        Assert.That(NodeMask.Empty.First, Is.EqualTo(-1), "no first node of the empty set");
        Assert.That((a | b).NthNode(2), Is.EqualTo(4), "the third node counting from zero");
        Assert.That(a.NthNode(2), Is.EqualTo(-1), "a two-node set has no third node");
        Assert.That(NodeMask.Of(3).IsSubsetOf(a), Is.True, "subset");
        Assert.That(b.IsSubsetOf(a), Is.False, "not a subset");
        Assert.That(NodeMask.FirstNodes(64).Count, Is.EqualTo(64), "all 64 nodes");
        Assert.That(() => NodeMask.Of(64), Throws.InstanceOf<ArgumentOutOfRangeException>(), "node 64 is out of range");
    }
}
